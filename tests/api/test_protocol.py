"""The wire format's own rules: what a request maps to for the engine (sampling, tools, output
constraint, chat-template messages) and what it refuses, without a server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.api.chat.protocol import ChatCompletionRequest, ChatMessage
from server.api.completions.protocol import CompletionRequest
from server.engine.types import OutputConstraint, SamplingParams, ToolSpec

HELLO = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}}
OTHER = {"type": "function", "function": {"name": "get_time"}}


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": HELLO, **fields})


def test_plain_text_has_no_constraint():
    assert chat().constraint() is None
    assert chat(response_format={"type": "text"}).constraint() is None


def test_response_formats_map_to_their_constraint():
    assert chat(response_format={"type": "json_object"}).constraint() == OutputConstraint(
        json_object=True, tool_choice="none"
    )
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}}
    assert chat(response_format=fmt).constraint() == OutputConstraint(json_schema=WEATHER, tool_choice="none")


@pytest.mark.parametrize(
    "choice,expected",
    [
        (None, "auto"),
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
    ],
)
def test_tools_map_to_specs_and_the_choice(choice, expected):
    fields = {"tools": [TOOL, OTHER]} | ({} if choice is None else {"tool_choice": choice})
    constraint = chat(**fields).constraint()
    assert constraint is not None and constraint.tool_choice == expected and constraint.parallel_tool_calls
    assert constraint.tools == (
        ToolSpec("get_weather", WEATHER, "Weather", False),
        ToolSpec("get_time", {"type": "object", "properties": {}}, None, False),
    )


def test_parallel_tool_calls_and_strict_reach_the_engine():
    strict = {"type": "function", "function": {"name": "f", "parameters": WEATHER, "strict": True}}
    constraint = chat(tools=[strict], parallel_tool_calls=False).constraint()
    assert constraint is not None and not constraint.parallel_tool_calls and constraint.tools[0].strict
    assert chat(tools=[TOOL], parallel_tool_calls=True).constraint().parallel_tool_calls  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [TOOL, TOOL]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"response_format": {"type": "xml"}}, "type"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 0}, "n"),
    ],
)
def test_requests_that_cannot_be_served_as_sent_are_refused(fields, field):
    with pytest.raises(ValidationError) as refused:
        chat(**fields)
    assert field in str(refused.value)


def test_tool_choice_none_needs_no_tools():
    assert chat(tool_choice="none").constraint() is None


@pytest.mark.parametrize(
    "message,says",
    [
        ({"role": "user"}, "needs content"),
        ({"role": "assistant"}, "content or tool_calls"),
        ({"role": "user", "content": "x", "tool_calls": []}, "only assistant"),
        ({"role": "tool", "content": "x"}, "tool_call_id"),
    ],
)
def test_each_role_has_its_fields(message, says):
    with pytest.raises(ValidationError) as refused:
        ChatMessage.model_validate(message)
    assert says in str(refused.value)


def test_messages_become_chat_template_dicts():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    bad = {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "not json"}}
    assistant = ChatMessage.model_validate({"role": "assistant", "tool_calls": [call, bad]})
    assert assistant.to_template() == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "not json"}},
        ],
    }
    tool = ChatMessage.model_validate({"role": "tool", "content": "21 C", "tool_call_id": "c1", "name": "f"})
    assert tool.to_template() == {"role": "tool", "content": "21 C", "name": "f", "tool_call_id": "c1"}
    developer = ChatMessage.model_validate({"role": "developer", "content": "be brief"})
    assert developer.to_template() == {"role": "system", "content": "be brief"}


def test_sampling_params_keep_the_engines_defaults_for_what_was_not_sent():
    assert chat().to_sampling_params() == SamplingParams()
    params = chat(
        max_tokens=5,
        max_completion_tokens=7,
        temperature=0.0,
        top_p=0.5,
        top_k=-1,
        min_p=0.1,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=3,
        stop="END",
        logprobs=True,
        top_logprobs=2,
        logit_bias={"7": -100},
    ).to_sampling_params()
    assert params == SamplingParams(
        max_tokens=7,
        temperature=0.0,
        top_p=0.5,
        top_k=0,
        min_p=0.1,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=3,
        stop=["END"],
        logprobs=True,
        top_logprobs=2,
        logit_bias={7: -100.0},
    )


def completion(**fields: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", **fields})


@pytest.mark.parametrize(
    "prompt,prompts",
    [("a b", ["a b"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_completion_prompts_come_in_four_shapes(prompt, prompts):
    assert completion(prompt=prompt).prompts() == prompts


@pytest.mark.parametrize(
    "fields",
    [{"prompt": []}, {"prompt": [[]]}, {"prompt": [-1]}, {"prompt": "x", "suffix": "y"}, {"prompt": "x", "best_of": 2}],
)
def test_completion_requests_refused(fields):
    with pytest.raises(ValidationError):
        completion(**fields)


def test_completion_logprobs_are_a_count():
    assert completion(prompt="x").to_sampling_params().logprobs is False
    params = completion(prompt="x", logprobs=3, best_of=1).to_sampling_params()
    assert params.logprobs and params.top_logprobs == 3
    assert completion(prompt="x", logprobs=0).to_sampling_params().logprobs
