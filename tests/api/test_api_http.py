"""HTTP behaviour of the API through httpx's ASGI transport, against FakeEngine."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from support.fake_engine import FakeEngine
from support.sse import sse_events

from server.api.app import create_app
from server.engine.types import PromptTooLong

pytestmark = pytest.mark.anyio

MODEL = "fake-model"
HELLO = [{"role": "user", "content": "hello there world"}]


def client_for(app, **transport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, **transport), base_url="http://test")


async def chat(client: httpx.AsyncClient, **body) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, **body})


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    return error


async def test_completion_carries_text_usage_and_ids(client):
    r = await chat(client)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-") and body["created"] > 0
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "hello there world"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 4,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_max_tokens_ends_with_length(client):
    body = (await chat(client, max_tokens=2)).json()
    assert body["choices"][0]["message"]["content"] == "hello there"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
    # max_completion_tokens is OpenAI's newer name and wins over max_tokens.
    body = (await chat(client, max_tokens=2, max_completion_tokens=1)).json()
    assert body["choices"][0]["message"]["content"] == "hello"


@pytest.mark.parametrize("stop", ["ere w", ["zzz", "ere w"]])
async def test_stop_strings_cut_the_text(client, stop):
    body = (await chat(client, stop=stop)).json()
    assert body["choices"][0]["message"]["content"] == "hello th"
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_stream_chunks_role_first_finish_last_then_done(client):
    r = await chat(client, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "hello there world"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all(c.get("usage") is None for c in chunks)


async def test_stream_include_usage_adds_a_usage_chunk(client):
    events = sse_events(await chat(client, stream=True, max_tokens=2, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    usage_chunk, finish_chunk = events[-2], events[-3]
    assert finish_chunk["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 4 and usage_chunk["usage"]["completion_tokens"] == 2
    assert usage_chunk["usage"]["total_tokens"] == 6


async def test_sampling_fields_reach_the_engine(client, engine):
    r = await chat(
        client,
        temperature=0,
        top_p=0.9,
        top_k=-1,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"7": -100, "3": 2.5},
        seed=42,
        stop="zzz",
        some_future_field={"ignored": True},  # unknown fields are ignored, as OpenAI-compatible servers do
    )
    assert r.status_code == 200, r.text
    _, prompt_ids, params = engine.requests[-1]
    assert params.max_tokens == 64 - len(prompt_ids)  # omitted: up to the context limit
    assert params.greedy and params.top_p == 0.9 and params.top_k == 0 and params.min_p == 0.05
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.1, 0.5, -0.5)
    assert params.logit_bias == {7: -100.0, 3: 2.5}
    assert params.seed == 42 and params.stop == ["zzz"] and not params.logprobs


async def test_logprobs_in_completion_and_stream(client):
    body = (await chat(client, logprobs=True, top_logprobs=2, max_tokens=2)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in content] == ["hello", "there"]
    assert content[0]["bytes"] == list(b"hello") and len(content[0]["top_logprobs"]) == 2
    events = sse_events(await chat(client, logprobs=True, max_tokens=2, stream=True))
    tokens = [
        t["token"] for c in events[:-1] if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]
    ]
    assert tokens == ["hello", "there"]


async def test_text_parts_and_roles_reach_the_chat_template(client, engine):
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]},
    ]
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert r.json()["choices"][0]["message"]["content"] == "two parts"
    _, prompt_ids, _ = engine.requests[-1]
    assert len(prompt_ids) == 1 + 2 + 1 + 2  # <system> be brief <user> two parts


LONG = [{"role": "user", "content": " ".join(["word"] * 70)}]

BAD_REQUESTS = [
    # (body, status, param)
    ({"messages": HELLO}, 400, "model"),
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": MODEL, "messages": HELLO, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ({"model": MODEL, "messages": HELLO, "temperature": 2.5}, 400, "temperature"),
    ({"model": MODEL, "messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": HELLO, "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "messages": HELLO, "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "messages": HELLO, "n": 1000}, 400, "n"),
    ({"model": MODEL, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "messages": HELLO, "stop": [""]}, 400, "stop"),
    ({"model": MODEL, "messages": HELLO, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"model": MODEL, "messages": HELLO, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": MODEL, "messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": MODEL, "messages": HELLO, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (
        {"model": MODEL, "messages": HELLO, "stream_options": {"include_usage": "yes"}},
        400,
        "stream_options.include_usage",
    ),
    ({"model": "gpt-4o", "messages": HELLO}, 404, "model"),
    ({"model": MODEL, "messages": LONG}, 400, "messages"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": 61}, 400, "max_tokens"),
    ([HELLO], 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
@pytest.mark.parametrize("stream", [False, True])
async def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, body, status, param, stream):
    if stream and isinstance(body, dict):
        body = {**body, "stream": body.get("stream", True)}
    assert_openai_error(await client.post("/v1/chat/completions", json=body), status, param)
    assert (await chat(client)).status_code == 200


async def test_context_errors_say_what_fits(client):
    error = assert_openai_error(await chat(client, max_tokens=61), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded" and "at most 60" in error["message"]
    error = assert_openai_error(await chat(client, messages=LONG), 400, "messages")
    assert error["code"] == "context_length_exceeded" and "71 tokens" in error["message"]


@pytest.mark.parametrize(
    "raw,headers",
    [
        (b'{"model": "fake-model", "messages": [', {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (b"model=fake-model", {"content-type": "application/x-www-form-urlencoded"}),
    ],
)
async def test_unparseable_bodies_are_400(client, raw, headers):
    assert_openai_error(await client.post("/v1/chat/completions", content=raw, headers=headers), 400)
    assert (await chat(client)).status_code == 200


async def test_a_body_not_declared_json_is_refused(client, engine):
    # A web page may POST text/plain across origins without a preflight: no generation may start.
    for headers in [{}, {"Content-Type": "text/plain"}]:
        r = await client.post(
            "/v1/chat/completions", content=json.dumps({"model": MODEL, "messages": HELLO}), headers=headers
        )
        assert "Content-Type: application/json" in assert_openai_error(r, 400)["message"]
    assert engine.requests == []


async def test_unknown_routes_and_methods_are_openai_errors(client):
    assert_openai_error(await client.get("/v1/nothing"), 404)
    assert_openai_error(await client.get("/v1/chat/completions"), 405)


async def test_models_and_health(client, engine):
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [(MODEL, "model")]
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "model": MODEL, "engine": engine.stats()}


async def test_leaving_the_lifespan_shuts_the_engine_down(engine):
    app = create_app(engine)
    async with app.router.lifespan_context(app):
        assert not engine.is_shut_down
    assert engine.is_shut_down


async def test_the_app_serves_the_engines_model_name():
    async with client_for(create_app(FakeEngine(model_name="my-mla"))) as c:
        assert (await c.get("/v1/models")).json()["data"][0]["id"] == "my-mla"
        r = await c.post("/v1/chat/completions", json={"model": "my-mla", "messages": HELLO})
        assert r.status_code == 200 and r.json()["model"] == "my-mla"
        assert_openai_error(await chat(c), 404, "model")


async def test_api_key_guards_v1_but_not_health(engine):
    async with client_for(create_app(engine, api_key="sekret")) as c:
        assert (await c.get("/health")).status_code == 200
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sekret"}]:
            r = await c.get("/v1/models", headers=headers)
            assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
            r = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO}, headers=headers)
            assert_openai_error(r, 401)
        ok = {"Authorization": "Bearer sekret"}
        assert (await c.get("/v1/models", headers=ok)).status_code == 200
        r = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO}, headers=ok)
        assert r.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_refusal_before_the_first_token_is_a_json_503(stream):
    async with client_for(create_app(FakeEngine(fail_after=0))) as c:
        r = await chat(c, stream=stream)
        error = assert_openai_error(r, 503)
        assert error["type"] == "server_error" and "on purpose" in error["message"]


class PromptRefusingEngine(FakeEngine):
    async def generate(self, request_id, prompt_ids, params):
        raise PromptTooLong("prompt too long for the cache")
        yield


async def test_engine_prompt_too_long_is_a_400():
    async with client_for(create_app(PromptRefusingEngine())) as c:
        error = assert_openai_error(await chat(c), 400, "messages")
        assert error["code"] == "context_length_exceeded"


async def test_engine_failure_mid_stream_is_an_error_event_then_done():
    engine = FakeEngine(fail_after=2)
    async with client_for(create_app(engine)) as c:
        events = sse_events(await chat(c, stream=True))
        assert events[-1] == "[DONE]"
        assert "on purpose" in events[-2]["error"]["message"]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "hello there"
        assert_openai_error(await chat(c), 503)


async def test_engine_shutdown_ends_live_streams_cleanly():
    engine = FakeEngine(token_delay=0.01)
    long_prompt = [{"role": "user", "content": " ".join(f"w{i}" for i in range(300))}]
    async with client_for(create_app(engine)) as c:
        streams = [asyncio.create_task(chat(c, stream=True, messages=long_prompt)) for _ in range(3)]
        await asyncio.sleep(0.1)
        engine.shutdown()
        for response in await asyncio.wait_for(asyncio.gather(*streams), timeout=5):
            events = sse_events(response)
            assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
        assert engine.stats()["running"] == 0
        assert_openai_error(await chat(c), 503)  # a shut-down engine refuses, it doesn't hang


class BrokenEngine(FakeEngine):
    def encode_chat(self, messages, tools=None):
        if messages[-1]["content"] == "boom":
            raise RuntimeError("bug")
        return super().encode_chat(messages, tools)

    async def generate(self, request_id, prompt_ids, params):
        async for delta in super().generate(request_id, prompt_ids, params):
            yield delta
            if self.tokenizer.piece(prompt_ids[-1]).strip() == "crash":
                raise RuntimeError("bug")


async def test_unexpected_exceptions_are_500s_and_the_server_keeps_serving():
    async with client_for(create_app(BrokenEngine()), raise_app_exceptions=False) as c:
        error = assert_openai_error(await chat(c, messages=[{"role": "user", "content": "boom"}]), 500)
        assert error["type"] == "server_error" and "bug" not in error["message"]
        events = sse_events(await chat(c, stream=True, messages=[{"role": "user", "content": "crash crash"}]))
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
        assert (await chat(c)).status_code == 200


async def call_asgi(app, body: dict, disconnect_on_receive: int, slow_start: bool = False) -> None:
    """Runs one POST straight through the ASGI app; the client leaves at that receive() call
    (1: while the first token is awaited, 2: as the response starts). With `slow_start`, sending
    the response headers takes long enough for the client to leave first."""
    calls = 0

    async def receive() -> dict:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        if calls <= disconnect_on_receive:
            await asyncio.Event().wait()  # a client that says nothing until cancelled
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if slow_start and message["type"] == "http.response.start":
            await asyncio.sleep(0.1)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=5)


@pytest.mark.parametrize(
    "stream,disconnect_on_receive,slow_start",
    [(False, 1, False), (False, 2, False), (True, 1, False), (True, 2, False), (True, 2, True)],
)
async def test_a_client_that_leaves_cancels_its_engine_request(stream, disconnect_on_receive, slow_start):
    engine = FakeEngine(model_name=MODEL, token_delay=0.01)
    body = {"model": MODEL, "messages": LONG, "stream": stream, "max_tokens": 50}
    await call_asgi(create_app(engine), body, disconnect_on_receive, slow_start)
    assert engine.finished == [] and engine.cancelled == [engine.requests[0][0]]


@pytest.mark.parametrize(
    "body,param,says",
    [
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "text"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
        ({"messages": HELLO, "stop": 5}, "stop", "list of strings"),
        ({"messages": HELLO, "n": 17}, "n", "at most 16"),
    ],
)
async def test_error_messages_name_the_field_and_the_fix(client, body, param, says):
    error = assert_openai_error(await client.post("/v1/chat/completions", json={"model": MODEL, **body}), 400, param)
    assert error["message"].startswith(f"{param}: ") and says in error["message"]
