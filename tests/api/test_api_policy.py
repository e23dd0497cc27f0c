"""API decisions that a wrong line would quietly change, as properties of the policy:

- `n` must be exactly 1: every other value is a 400 naming `n`;
- the usage chunk is sent only when the client asked (`stream_options.include_usage: true`);
- `context_length_exceeded` is the code of context errors alone: no other 400 carries it.
"""

from __future__ import annotations

import httpx
import pytest
from support.fake_engine import FakeEngine
from support.sse import sse_events

from server.api.app import create_app
from server.engine.types import InvalidRequest

pytestmark = pytest.mark.anyio

MODEL = "fake-model"
HELLO = [{"role": "user", "content": "hello there world"}]


async def chat(client, **body):
    return await client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, **body})


@pytest.mark.parametrize("n", [0, -1, 17, 1000])
async def test_n_outside_one_to_the_maximum_is_refused(client, engine, n):
    r = await chat(client, n=n)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "n"
    assert engine.requests == []  # refused before the engine saw it


@pytest.mark.parametrize("n", [1, None, 3, 16])
async def test_n_up_to_the_maximum_is_served(client, n):
    body = {} if n is None else {"n": n}
    r = await chat(client, **body)
    assert r.status_code == 200 and len(r.json()["choices"]) == (n or 1)
    assert [c["index"] for c in r.json()["choices"]] == list(range(n or 1))


@pytest.mark.parametrize(
    "options", [None, {}, {"include_usage": False}], ids=["no-stream_options", "empty", "include_usage-false"]
)
async def test_no_usage_chunk_unless_asked(client, options):
    body = {"stream": True} if options is None else {"stream": True, "stream_options": options}
    events = sse_events(await chat(client, **body))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["choices"] for c in chunks), "a chunk without choices (a usage chunk) was sent"
    assert all(c.get("usage") is None for c in chunks)


async def test_the_usage_chunk_comes_when_asked(client):
    events = sse_events(await chat(client, stream=True, stream_options={"include_usage": True}))
    usage_chunks = [c for c in events[:-1] if not c["choices"]]
    assert len(usage_chunks) == 1 and usage_chunks[0] is events[-2]
    assert usage_chunks[0]["usage"]["completion_tokens"] == 4


PLAIN_400S = [
    {"max_tokens": 0},
    {"temperature": 2.5},
    {"n": 0},
    {"stop": [""]},
    {"top_logprobs": 2},
    {"messages": []},
    {"messages": [{"role": "robot", "content": "hi"}]},
]


@pytest.mark.parametrize("body", PLAIN_400S, ids=lambda b: next(iter(b)))
async def test_a_validation_400_is_not_a_context_error(client, body):
    r = await chat(client, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] != "context_length_exceeded"


async def test_unparseable_json_is_not_a_context_error(client):
    r = await client.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] != "context_length_exceeded"


class RefusingEngine(FakeEngine):
    async def generate(self, request_id, prompt_ids, params):
        raise InvalidRequest("logit_bias token ids out of range", param="logit_bias")
        yield


async def test_an_engine_refusal_that_is_not_about_length_is_not_a_context_error():
    transport = httpx.ASGITransport(app=create_app(RefusingEngine(model_name=MODEL)))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await chat(c)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "logit_bias" and r.json()["error"]["code"] != "context_length_exceeded"


@pytest.mark.parametrize("body", [{"max_tokens": 61}, {"messages": [{"role": "user", "content": "w " * 70}]}])
async def test_context_errors_carry_their_code(client, body):
    r = await chat(client, **body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
