"""Tools and structured output through a real uvicorn and the official SDK, on the random demo
model: what the grammar enforces holds however random the model is."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from support.tool_schemas import FORECAST

TOOLS = [
    {"type": "function", "function": {"name": "get_forecast", "description": "Weather", "parameters": FORECAST}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def engine(demo_engine):
    return demo_engine


@pytest.fixture
def base(engine, serve_engine) -> str:
    return serve_engine(engine)


def many(base: str, count: int, **request: object) -> list[object]:
    """`count` concurrent chat completions (they batch in the engine)."""

    async def run() -> list[object]:
        async with openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300) as client:
            return list(
                await asyncio.gather(*[client.chat.completions.create(**request, seed=i) for i in range(count)])
            )

    return asyncio.run(run())


def test_json_schema_answers_parse_and_validate_100_of_100(engine, base):
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST, "strict": True}}
    replies = many(
        base, 100, model=engine.model_name, messages=ASK, response_format=fmt, temperature=1.0, max_tokens=80
    )
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), FORECAST)


def test_required_tool_choice_gives_a_valid_call_100_of_100(engine, base):
    replies = many(
        base,
        100,
        model=engine.model_name,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        max_tokens=80,
    )
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def streamed_and_whole(base: str, **request: object) -> tuple[object, dict[str, object]]:
    """The whole reply's choice, and the same request streamed: its pieces per call, its content
    and finish_reason."""
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    whole = client.chat.completions.create(**request).choices[0]
    streamed: dict[str, object] = {"calls": {}, "content": "", "finish": None}
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            streamed["finish"] = choice.finish_reason or streamed["finish"]
            streamed["content"] += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                streamed["calls"].setdefault(piece.index, []).append(piece)
    return whole, streamed


def joined(pieces: list[object]) -> tuple[str, str, str]:
    """(id, name, arguments) of one streamed call, its pieces put together as a client does."""
    head, *rest = pieces
    assert head.id and head.type == "function" and head.function.name  # the first piece names the call
    assert all(p.id is None and p.type is None and p.function.name is None for p in rest)
    return head.id, head.function.name, "".join(p.function.arguments for p in pieces)


def test_a_streamed_tool_call_equals_the_whole_one_under_the_same_seed(engine, base):
    whole, streamed = streamed_and_whole(
        base,
        model=engine.model_name,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_forecast"}},
        temperature=1.0,
        seed=11,
        max_tokens=80,
    )
    (expected,) = whole.message.tool_calls
    assert streamed["finish"] == whole.finish_reason == "tool_calls"
    (pieces,) = streamed["calls"].values()
    assert len(pieces) > 5  # the arguments came as they were generated
    _, name, arguments = joined(pieces)
    assert (name, arguments) == (expected.function.name, expected.function.arguments)
    jsonschema.validate(json.loads(arguments), FORECAST)


def test_a_tool_call_cut_by_max_tokens_comes_back_partial_streamed_or_whole(engine, base):
    for max_tokens, seed in ((12, 3), (4, 5)):  # mid-arguments; before the name is complete
        whole, streamed = streamed_and_whole(
            base,
            model=engine.model_name,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=max_tokens,
        )
        assert streamed["finish"] == whole.finish_reason == "length"
        calls = [joined(pieces)[1:] for _, pieces in sorted(streamed["calls"].items())]
        assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
        assert streamed["content"] == (whole.message.content or "")
        if max_tokens == 12:
            ((name, arguments),) = calls
            assert name in ("get_forecast", "get_time") and arguments.startswith("{")
            with pytest.raises(json.JSONDecodeError):
                json.loads(arguments)  # as far as it got
        else:
            assert not calls and whole.message.content.startswith("[TOOL_CALLS]get")


def test_tool_history_reaches_the_template_and_none_never_calls(engine, base):
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_forecast", "arguments": '{"city": "Paris", "days": 1, "unit": "C"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    plain = client.chat.completions.create(model=engine.model_name, messages=ASK, max_tokens=1)
    with_tools = client.chat.completions.create(
        model=engine.model_name, messages=history, tools=TOOLS, tool_choice="none", max_tokens=16, temperature=1.0
    )
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 40  # definitions and history
    assert with_tools.choices[0].finish_reason in ("stop", "length")
    assert not with_tools.choices[0].message.tool_calls


def test_an_invalid_schema_is_a_400_with_the_librarys_message(engine, base):
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=engine.model_name, messages=ASK, response_format=fmt, max_tokens=8)
    assert refused.value.body["param"] == "response_format" and "schema" in refused.value.body["message"]


def test_max_tokens_mid_object_ends_with_length(engine, base):
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST}}
    reply = client.chat.completions.create(model=engine.model_name, messages=ASK, response_format=fmt, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"


def test_logprob_bytes_rebuild_the_content_and_eos_has_no_entry(random_engine, serve_engine):
    # The random model: its flat distributions sample tokens that hold part of a character.
    engine = random_engine
    client = openai.OpenAI(base_url=serve_engine(engine), api_key="unused", max_retries=0)
    multibyte = 0
    for seed in range(6):
        reply = client.chat.completions.create(
            model=engine.model_name, messages=ASK, logprobs=True, top_logprobs=2, max_tokens=48, seed=seed
        )
        choice = reply.choices[0]
        entries = choice.logprobs.content
        joined = b"".join(bytes(e.bytes) for e in entries)
        assert joined.decode("utf-8", "replace") == choice.message.content
        multibyte += sum(1 for e in entries if e.token.endswith("\ufffd") or "\ufffd" in e.token)
        expected = reply.usage.completion_tokens - (choice.finish_reason == "stop")
        assert len(entries) == expected  # the EOS that ended a "stop" reply is not an entry
    assert multibyte, "no token held part of a character: the case this test is for never came up"


def test_json_schema_composes_with_n_stop_and_streaming(engine, base):
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST, "strict": True}}
    reply = client.chat.completions.create(
        model=engine.model_name, messages=ASK, response_format=fmt, n=3, seed=5, temperature=1.0, max_tokens=80
    )
    assert len(reply.choices) == 3
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), FORECAST)
    text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=engine.model_name,
            messages=ASK,
            response_format=fmt,
            seed=5,
            temperature=1.0,
            max_tokens=80,
            stream=True,
        )
        if chunk.choices
    )
    assert text == reply.choices[0].message.content  # choice 0 streams the same under the same seed
