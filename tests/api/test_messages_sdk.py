"""/v1/messages through a real uvicorn and the official `anthropic` SDK, on the demo model: whole
and streamed replies, a tool conversation, tool_choice enforced while decoding, errors as the
SDK's exception classes, count_tokens.

The Messages API has no seed: replies compared across requests are greedy (temperature 0). The
SDK no longer takes sampling parameters as arguments (newer Claude models refuse them); they go in
`extra_body`, as a user of a local model sends them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anthropic
import jsonschema
import pytest
from support.fake_engine import FakeEngine
from support.tool_schemas import FORECAST

from server.engine.types import EngineOverloaded, SamplingParams, StreamDelta

TOOLS = [
    {"name": "get_forecast", "description": "Weather", "input_schema": FORECAST},
    {
        "name": "get_time",
        "input_schema": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
    },
]
SCHEMAS = {t["name"]: t["input_schema"] for t in TOOLS}


class BusyEngine(FakeEngine):
    """An engine whose queue is always full."""

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[StreamDelta]:
        raise EngineOverloaded("the server is at its limit; retry shortly")
        yield


GREEDY = {"temperature": 0.0}
SYSTEM = "Be kind and answer briefly. " * 20  # longer than a cache block (64 tokens)
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def blocks(message: anthropic.types.Message) -> list[dict[str, object]]:
    """The content blocks as plain data, less what differs between two requests (a tool call's id)
    or between the SDK's two readings (a streamed message's blocks are its Parsed* kind)."""
    return [b.model_dump(exclude={"parsed_output", "id"}) for b in message.content]


@pytest.fixture
def engine(demo_engine):
    return demo_engine


@pytest.fixture
def base(engine, serve_engine) -> str:
    return serve_engine(engine).removesuffix("/v1")


@pytest.fixture
def client(base) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)


def test_whole_and_streamed_replies_are_equal_when_greedy(engine, client):
    request = {
        "model": engine.model_name,
        "max_tokens": 24,
        "messages": ASK,
        "system": SYSTEM,
        "extra_body": GREEDY,
    }
    whole = client.messages.create(**request)
    with client.messages.stream(**request) as stream:
        texts = list(stream.text_stream)
        streamed = stream.get_final_message()
    assert len(texts) > 1  # it came in pieces
    assert whole.content and whole.content[0].type == "text"
    assert blocks(streamed) == blocks(whole) and "".join(texts) == whole.content[0].text
    assert (streamed.stop_reason, streamed.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)
    assert whole.stop_reason in ("end_turn", "max_tokens")
    # The second request found the first's prompt in the prefix cache.
    assert streamed.usage.cache_read_input_tokens > 0
    total = streamed.usage.input_tokens + streamed.usage.cache_read_input_tokens
    assert total == whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    counted = client.messages.count_tokens(model=engine.model_name, messages=ASK, system=SYSTEM)
    assert counted.input_tokens == total


def test_a_streamed_tool_call_equals_the_whole_one(engine, client):
    request = {
        "model": engine.model_name,
        "max_tokens": 80,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "tool", "name": "get_forecast"},
        "extra_body": GREEDY,
    }
    whole = client.messages.create(**request)
    with client.messages.stream(**request) as stream:
        fragments = [e.partial_json for e in stream if e.type == "input_json"]
        streamed = stream.get_final_message()
    assert len(fragments) > 3  # the input streamed as it was generated
    (call,) = whole.content
    assert call.type == "tool_use" and call.name == "get_forecast" and whole.stop_reason == "tool_use"
    jsonschema.validate(call.input, FORECAST)
    assert blocks(streamed) == blocks(whole) and streamed.stop_reason == "tool_use"


def test_tool_choice_any_gives_a_valid_call_100_of_100(engine, base):
    async def run() -> list[anthropic.types.Message]:
        async with anthropic.AsyncAnthropic(base_url=base, api_key="unused", max_retries=0, timeout=300) as client:
            calls = [
                client.messages.create(
                    model=engine.model_name,
                    max_tokens=80,
                    messages=ASK,
                    tools=TOOLS,
                    tool_choice={"type": "any", "disable_parallel_tool_use": True},
                    extra_body={"temperature": 1.0},
                )
                for _ in range(100)
            ]
            return list(await asyncio.gather(*calls))

    for reply in asyncio.run(run()):
        assert reply.stop_reason == "tool_use", reply
        (call,) = reply.content
        assert call.type == "tool_use" and call.id
        jsonschema.validate(call.input, SCHEMAS[call.name])


def test_a_tool_conversation_call_result_answer(engine, client):
    first = client.messages.create(
        model=engine.model_name,
        max_tokens=80,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_time"},
        extra_body=GREEDY,
    )
    (call,) = first.content
    assert call.type == "tool_use" and call.input in ({"zone": "UTC"}, {"zone": "CET"})
    conversation = [
        *ASK,
        {"role": "assistant", "content": [c.model_dump() for c in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "12:00"}]},
    ]
    for stream in (False, True):
        request = {
            "model": engine.model_name,
            "max_tokens": 16,
            "messages": conversation,
            "tools": TOOLS,
            "tool_choice": {"type": "none"},
        }
        if stream:
            with client.messages.stream(**request) as s:
                answer = s.get_final_message()
        else:
            answer = client.messages.create(**request)
        assert answer.stop_reason in ("end_turn", "max_tokens")
        assert [b.type for b in answer.content] == ["text"] and answer.content[0].text
        assert answer.usage.cache_read_input_tokens > 0  # the conversation so far was cached


def test_errors_are_the_sdks_exception_classes(engine, base, serve_engine, client):
    ok = {"model": engine.model_name, "max_tokens": 4, "messages": ASK}
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(**{**ok, "model": "claude-sonnet-4-5"})
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(**{**ok, "thinking": {"type": "enabled", "budget_tokens": 1024}})
    assert "does not think" in bad.value.message
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(**{**ok, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]})
    keyed = serve_engine(engine, api_key="sekret").removesuffix("/v1")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=keyed, api_key="wrong", max_retries=0).messages.create(**ok)
    assert anthropic.Anthropic(base_url=keyed, api_key="sekret", max_retries=0).messages.create(**ok).content
    busy = serve_engine(BusyEngine(model_name=engine.model_name)).removesuffix("/v1")
    with pytest.raises(anthropic.RateLimitError) as limited:
        anthropic.Anthropic(base_url=busy, api_key="unused", max_retries=0).messages.create(**ok)
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    with pytest.raises(anthropic.BadRequestError) as long:
        client.messages.create(**{**ok, "messages": [{"role": "user", "content": "a " * 200_000}]})
    assert "context length" in long.value.message


def test_a_stream_refused_before_its_first_event_raises(client):
    """A refusal comes before the stream starts: a plain error response, which the SDK raises."""
    with pytest.raises(anthropic.NotFoundError), client.messages.stream(model="no", max_tokens=4, messages=ASK) as s:
        s.get_final_message()
