"""ToolCallStream and the demo tokenizer's tool syntax, token by token (no model)."""

from __future__ import annotations

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


def test_mistral_arguments_stream_token_by_token_and_parallel_calls_take_the_next_index():
    stream = ToolCallStream(tok(), parallel=True)
    args = '{"x":[1, 2],"city":"東京"}'  # the model's own spacing; 東 and 京 are 3 byte tokens each
    head, tail = ids("[TOOL_CALLS]get_time"), ids("[ARGS]")
    pieces = [stream.feed(t)[1] for t in head + tail + ids(args)]
    assert pieces[: len(head)] == [[]] * len(head)  # the name may still grow
    (named,) = pieces[len(head)]
    assert (named.index, named.name, named.arguments) == (0, "get_time", "") and named.id.startswith("call_")
    fragments = pieces[len(head) + 1 :]
    assert sum(not p for p in fragments) == 4  # the first two bytes of 東 and of 京 wait for the third
    assert all((d.index, d.id, d.name) == (0, None, None) for p in fragments for d in p)
    assert "".join(d.arguments for p in pieces for d in p) == args
    second = [d for t in ids("[TOOL_CALLS]f[ARGS]{}") for d in stream.feed(t)[1]]
    assert [(d.index, d.name, d.arguments) for d in second] == [(1, "f", ""), (1, None, "{"), (1, None, "}")]
    assert second[0].id not in (None, named.id) and stream.count == 2


def test_mistral_json_list_calls_come_whole_with_the_models_id():
    stream = ToolCallStream(tok(), parallel=True)
    text = '[TOOL_CALLS][{"name": "get_time", "arguments": {"a":1}, "id": "abc"}]'
    out = [d for t in ids(text) for d in stream.feed(t)[1]]
    assert [(d.index, d.id, d.name, d.arguments) for d in out] == [(0, "abc", "get_time", '{"a": 1}')]


def test_token_stream_content_then_call_then_tool_calls_finish():
    params = SamplingParams(max_tokens=100, constraint=OutputConstraint(tools=TOOLS))
    stream = TokenStream(tok(), [], params, {2})
    texts, calls = [], []
    for t in ids("Sure: ") + ids("[TOOL_CALLS]get_time[ARGS]{}") + [2]:
        text, finish = stream.add(t)
        texts.append(text)
        calls += stream.pop_tool_calls() or []
    assert "".join(texts) == "Sure: " and finish == "tool_calls"
    assert [(c.index, c.name, c.arguments) for c in calls] == [(0, "get_time", ""), (0, None, "{"), (0, None, "}")]
    assert calls[0].id.startswith("call_")


def test_tool_choice_none_leaves_text_alone():
    params = SamplingParams(max_tokens=100, constraint=OutputConstraint(tools=TOOLS, tool_choice="none"))
    stream = TokenStream(tok(), [], params, {2})
    for t in ids("a[TOOL_CALLS]get_time[ARGS]{}"):
        stream.add(t)
    assert stream.pop_tool_calls() is None
