"""/v1/messages on the wire against the fake engine (it answers with the last message's words):
the prompt a request makes, the message and its events, stop reasons, usage, errors and auth in
Anthropic's shape."""

from __future__ import annotations

import httpx
import pytest
from support.fake_engine import FakeEngine
from support.sse import sse_events

from server.api.app import create_app

pytestmark = pytest.mark.anyio


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(model_name="fake-model", max_model_len=64)


def ask(**fields: object) -> dict[str, object]:
    return {"model": "fake-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hello there"}], **fields}


async def stream(client: httpx.AsyncClient, body: dict[str, object]) -> list[tuple[str, dict[str, object]]]:
    """(event name, payload) of each event of a streamed request."""
    async with client.stream("POST", "/v1/messages", json=body) as r:
        text = (await r.aread()).decode()
    names = [line.removeprefix("event:").strip() for line in text.splitlines() if line.startswith("event:")]
    return list(zip(names, sse_events(text), strict=True))


def assert_anthropic_error(r: httpx.Response, status: int, error_type: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type, body
    return str(body["error"]["message"])


async def test_a_message_with_its_usage(client):
    r = await client.post("/v1/messages", json=ask())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "message" and body["role"] == "assistant" and body["id"].startswith("msg_")
    assert body["content"] == [{"type": "text", "text": "hello there"}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    assert body["usage"] == {
        "input_tokens": 3,
        "output_tokens": 3,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    }


async def test_stop_reasons_max_tokens_and_stop_sequence(client):
    cut = (await client.post("/v1/messages", json=ask(max_tokens=1))).json()
    assert (cut["stop_reason"], cut["content"]) == ("max_tokens", [{"type": "text", "text": "hello"}])
    stopped = (await client.post("/v1/messages", json=ask(stop_sequences=["zz", "ere"]))).json()
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "ere")
    assert stopped["content"] == [{"type": "text", "text": "hello th"}]


async def test_max_tokens_beyond_the_context_is_a_cap(client, engine):
    r = await client.post("/v1/messages", json=ask(max_tokens=32000))
    assert r.status_code == 200, r.text
    assert engine.requests[-1][2].max_tokens == 64 - 3  # what the context leaves after the prompt


async def test_the_prompt_system_tool_use_and_tool_results(client, engine):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "weather?", "cache_control": {"type": "ephemeral"}}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "x"},
                {"type": "text", "text": "let me look"},
                {"type": "tool_use", "id": "call_1", "name": "get", "input": {"city": "Paris"}},
            ],
        },
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "no such city", "is_error": True},
                {"type": "text", "text": "so?"},
            ],
        },
    ]
    tools = [{"name": "get", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}]
    system = [{"type": "text", "text": "you"}, {"type": "text", "text": "help"}]
    body = ask(messages=messages, system=system, tools=tools, thinking={"type": "adaptive"}, metadata={"user_id": "u"})
    seen: list[list[dict[str, object]]] = []
    engine.encode_chat = lambda m, t=None, original=engine.encode_chat: seen.append(m) or original(m, t)  # type: ignore[method-assign]
    r = await client.post("/v1/messages?beta=true", json=body, headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text
    assert seen[-1] == [
        {"role": "system", "content": "you\nhelp"},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "let me look",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "system", "content": "be brief"},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Error: no such city"},
        {"role": "user", "content": "so?"},
    ]
    assert [t.name for t in engine.tools_seen[-1]] == ["get"]


async def test_count_tokens_equals_the_prompt_of_a_request(client):
    counted = await client.post(
        "/v1/messages/count_tokens", json={"model": "fake-model", "system": "be", **{"messages": ask()["messages"]}}
    )
    reply = (await client.post("/v1/messages", json=ask(system="be"))).json()
    assert counted.json() == {
        "input_tokens": reply["usage"]["input_tokens"] + reply["usage"]["cache_read_input_tokens"]
    }


async def test_the_stream_names_its_events(client):
    events = await stream(client, ask(stream=True))
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(name == d["type"] for name, d in events)
    data = [d for _, d in events]
    assert data[0]["message"]["usage"]["input_tokens"] == 3
    assert "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta") == "hello there"
    assert data[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert data[-2]["usage"]["output_tokens"] == 3


@pytest.mark.parametrize(
    ("change", "status", "error_type", "words"),
    [
        ({"model": "claude-x"}, 404, "not_found_error", "does not exist"),
        ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, 400, "invalid_request_error", "does not think"),
        ({"temperature": 1.5}, 400, "invalid_request_error", "temperature"),
        ({"tool_choice": {"type": "any"}}, 400, "invalid_request_error", "needs tools"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            400,
            "invalid_request_error",
            "'image' content blocks are not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]},
            400,
            "invalid_request_error",
            "cannot hold tool_use",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error", "tools"),
    ],
)
async def test_refusals_in_anthropic_shape(client, change, status, error_type, words):
    body = {k: v for k, v in {**ask(), **change}.items() if v is not None}
    assert words in assert_anthropic_error(await client.post("/v1/messages", json=body), status, error_type)


async def test_other_routes_keep_openai_errors(client):
    r = await client.post(
        "/v1/chat/completions", json={"model": "claude-x", "messages": [{"role": "user", "content": "a"}]}
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_a_failure_mid_stream_is_an_error_event(engine):
    engine.fail_after = 1
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(engine)), base_url="http://t") as c:
        events = await stream(c, ask(stream=True))
    assert events[-1] == (
        "error",
        {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "the fake engine failed on purpose"},
        },
    )


async def test_x_api_key_or_bearer(engine):
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(engine, api_key="k")), base_url="http://t"
    ) as c:
        assert_anthropic_error(await c.post("/v1/messages", json=ask()), 401, "authentication_error")
        wrong = await c.post("/v1/messages", json=ask(), headers={"x-api-key": "nope"})
        assert_anthropic_error(wrong, 401, "authentication_error")
        assert (await c.post("/v1/messages", json=ask(), headers={"x-api-key": "k"})).status_code == 200
        assert (await c.post("/v1/messages", json=ask(), headers={"authorization": "Bearer k"})).status_code == 200
        assert (await c.get("/v1/models", headers={"x-api-key": "k"})).status_code == 200
