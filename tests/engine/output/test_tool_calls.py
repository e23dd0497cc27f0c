"""ToolCallStream and the demo tokenizer's tool syntax, token by token (no model)."""

from __future__ import annotations

import json

from support.engine_harness import demo_model

from server.engine.output.detokenizer import TokenStream
from server.engine.output.tool_calls import ToolCallStream, tool_syntax
from server.engine.types import OutputConstraint, SamplingParams, ToolSpec

TOOLS = (ToolSpec("get_time", {}),)


def tok():
    return demo_model()[1]


def ids(text: str) -> list[int]:
    return list(tok().encode(text, add_special_tokens=False))


def test_demo_tokenizer_is_picked_up_as_mistral():
    t = tok()
    assert t.tool_call_start == "[TOOL_CALLS]" and len(t.tool_call_start_tokens) == 1
    syntax = tool_syntax(t)
    assert syntax is not None and syntax.start_id == t.tool_call_start_tokens[0]


def test_chat_template_renders_tools_calls_and_results():
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    text = tok().apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert '[TOOL_CALLS]f[ARGS]{"a": 1}</s>[TOOL_RESULTS]sunny[/TOOL_RESULTS]' in text
    assert text.endswith("[/AVAILABLE_TOOLS][INST]thanks[/INST]") and "[AVAILABLE_TOOLS][{" in text


def test_calls_come_out_when_complete():
    stream = ToolCallStream(tok(), parallel=True)
    kinds, deltas = [], []
    for t in ids("[TOOL_CALLS]") + ids('get_time[ARGS]{"x": [1, 2]}') + ids("[TOOL_CALLS]") + ids("f[ARGS]{}"):
        kind, out = stream.feed(t)
        kinds.append(kind)
        deltas.append(out)
    assert kinds[0] == "start" and set(kinds[1:]) <= {"tool", "start"}
    first = [i for i, d in enumerate(deltas) if d][0]
    assert deltas[first][0].name == "get_time" and json.loads(deltas[first][0].arguments) == {"x": [1, 2]}
    assert deltas[-1][0].index == 1 and deltas[-1][0].name == "f" and deltas[-1][0].arguments == "{}"
    assert stream.count == 2


def test_token_stream_content_then_call_then_tool_calls_finish():
    params = SamplingParams(max_tokens=100, constraint=OutputConstraint(tools=TOOLS))
    stream = TokenStream(tok(), [], params, {2})
    texts, calls = [], []
    for t in ids("Sure: ") + ids("[TOOL_CALLS]get_time[ARGS]{}") + [2]:
        text, finish = stream.add(t)
        texts.append(text)
        calls += stream.pop_tool_calls() or []
    assert "".join(texts) == "Sure: " and finish == "tool_calls"
    assert [(c.index, c.name, c.arguments) for c in calls] == [(0, "get_time", "{}")] and calls[0].id.startswith(
        "call_"
    )


def test_tool_choice_none_leaves_text_alone():
    params = SamplingParams(max_tokens=100, constraint=OutputConstraint(tools=TOOLS, tool_choice="none"))
    stream = TokenStream(tok(), [], params, {2})
    for t in ids("a[TOOL_CALLS]get_time[ARGS]{}"):
        stream.add(t)
    assert stream.pop_tool_calls() is None
