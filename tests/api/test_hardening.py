"""No single request can stall, crash or flood the server (issue: hardening).

A hostile corpus, each item answered 4xx in OpenAI's error shape with the server serving right
after; bodies refused before they are read; admission control (429 with Retry-After); host
allow-list; slowloris; timeouts the SDK does not retry; and the OpenAPI document matching what
is sent. The fuzz run at the end is schemathesis over the same document.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from contextlib import suppress
from functools import partial

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance
from support.fake_engine import FakeEngine

from server.api.app import create_app
from server.engine import EngineArgs
from server.engine.factory import start_engine
from server.engine.types import RequestTimeout
from server.serve import HeadTimeoutH11Protocol

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

MODEL = "fake-model"
KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def body(**fields: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello"}], **fields}).encode()


def message(**fields: object) -> bytes:
    return body(messages=[{"role": "user", **fields}])


SURROGATE = '"\\ud800"'  # valid JSON, not valid Unicode text
HOSTILE: dict[str, tuple[bytes, dict[str, str]]] = {
    "invalid JSON": (b'{"model": ', AUTH),
    "invalid UTF-8": (b'{"model": "\xff\xfe"}', AUTH),
    "not an object": (b"[1, 2, 3]", AUTH),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, AUTH),
    "deep object nesting": (b'{"a":' * 20_000 + b"1" + b"}" * 20_000, AUTH),
    "text/plain body": (body(), {**AUTH, "Content-Type": "text/plain"}),
    "no content type": (body(), {"Authorization": AUTH["Authorization"]}),
    "10 MB body": (message(content="a" * (10 << 20)), AUTH),
    "1M-character prompt": (message(content="word " * 200_000), AUTH),
    "prompt beyond context": (message(content="word " * 600), AUTH),
    "n=1000": (body(n=1000), AUTH),
    "n=0": (body(n=0), AUTH),
    "max_tokens=1e9": (body(max_tokens=1_000_000_000), AUTH),
    "max_tokens float": (body(max_tokens=1e9), AUTH),
    "negative max_tokens": (body(max_tokens=-1), AUTH),
    "NaN temperature": (body()[:-1] + b', "temperature": NaN}', AUTH),
    "inf top_p": (body()[:-1] + b', "top_p": Infinity}', AUTH),
    "negative temperature": (body(temperature=-1), AUTH),
    "negative top_k": (body(top_k=-5), AUTH),
    "NaN logit bias": (body()[:-1] + b', "logit_bias": {"1": NaN}}', AUTH),
    "surrogate in model": (body()[:-1].replace(b'"fake-model"', SURROGATE.encode()) + b"}", AUTH),
    "surrogate in content": (message()[:-3] + b', "content": ' + SURROGATE.encode() + b"}]}", AUTH),
    "surrogate in text part": (
        message(content=[{"type": "text", "text": "x"}]).replace(b'"x"', SURROGATE.encode()),
        AUTH,
    ),
    "surrogate in stop": (body()[:-1] + b', "stop": [' + SURROGATE.encode() + b"]}", AUTH),
    "surrogate in logit_bias key": (body()[:-1] + b', "logit_bias": {' + SURROGATE.encode() + b": 1}}", AUTH),
    "NUL in model": (body(model="fake\u0000model"), AUTH),
    "1,000 stop strings": (body(stop=[f"s{i}" for i in range(1000)]), AUTH),
    "empty stop string": (body(stop=[""]), AUTH),
    "superscript logit_bias key": (body(logit_bias={"²": 1}), AUTH),
    "negative logit_bias key": (body(logit_bias={"-1": 1}), AUTH),
    "huge logit_bias key": (body(logit_bias={"9" * 40: 1}), AUTH),
    "unknown role": (body(messages=[{"role": "wizard", "content": "hi"}]), AUTH),
    "null user content": (message(content=None), AUTH),
    "no messages": (body(messages=[]), AUTH),
    "stream_options without stream": (body(stream_options={"include_usage": True}), AUTH),
    "non-ASCII bearer": (body(), {**AUTH, "Authorization": "Bearer é"}),
    "unknown model": (body(model="gpt-4"), AUTH),
}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(model_name=MODEL, max_model_len=512)


@pytest.fixture(scope="module")
def short_engine():
    """The real engine on the demo model, with a short context so a long prompt is easy to make."""
    engine = start_engine(EngineArgs(served_model_name=MODEL, cache_tokens=64 * 64, max_model_len=512))
    yield engine
    engine.shutdown()


def raw_post(base: str, payload: bytes, headers: dict[str, str]) -> httpx.Response:
    """POST as bytes, headers as bytes too (httpx would refuse a non-ASCII header)."""
    encoded = [(k.encode(), v.encode()) for k, v in headers.items()]
    with httpx.Client(timeout=30) as client:
        return client.post(f"{base}/v1/chat/completions", content=payload, headers=encoded)


def assert_openai_error(response: httpx.Response) -> dict[str, object]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_is_a_4xx_and_the_server_keeps_serving(name, short_engine, serve_engine):
    base = serve_engine(short_engine, api_key=KEY).removesuffix("/v1")
    payload, headers = HOSTILE[name]
    assert_openai_error(raw_post(base, payload, headers))
    ok = raw_post(base, body(max_tokens=3), AUTH)
    assert ok.status_code == 200, ok.text


def test_a_body_over_the_limit_is_refused_from_its_length_before_it_is_sent(engine, serve_app):
    base = serve_app(create_app(engine, max_request_bytes=1000))
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10485760\r\n\r\n"
        )
        head = sock.recv(4096)  # no byte of the body was sent
    assert head.startswith(b"HTTP/1.1 413"), head


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams_in(engine, serve_app):
    base = serve_app(create_app(engine, max_request_bytes=1000))
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.setblocking(False)
        sent, head = 0, b""
        while not head and sent < 1 << 20:  # the body would go on; the answer must come first
            sock.sendall(b"200\r\n" + b" " * 512 + b"\r\n")
            sent += 512
            time.sleep(0.001)
            with suppress(BlockingIOError):
                head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert sent < 64 * 1024


def test_hosts_outside_the_allow_list_are_refused(engine, serve_app):
    base = serve_app(create_app(engine, allowed_hosts=["localhost", "127.0.0.1"]))
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/health", headers={"Host": "attacker.example"}).status_code == 400


def test_a_connection_that_never_finishes_its_head_is_closed(engine, serve_app):
    base = serve_app(create_app(engine), http=partial(HeadTimeoutH11Protocol, head_timeout=0.5))
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never completed
        start = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server
    assert time.monotonic() - start < 4
    assert httpx.get(f"{base}/health").status_code == 200


class TimingOutEngine(FakeEngine):
    async def generate(self, request_id, prompt_ids, params):
        self.requests.append((request_id, prompt_ids, params))
        raise RequestTimeout("request timed out")
        yield


def test_a_timed_out_request_is_not_retried_by_the_sdk(serve_app):
    engine = TimingOutEngine(model_name=MODEL)
    client = openai.OpenAI(base_url=serve_app(create_app(engine)) + "/v1", api_key="x", max_retries=2)
    with pytest.raises(openai.APIStatusError) as failure:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert failure.value.status_code == 503
    assert len(engine.requests) == 1  # no retries


def test_405_names_the_allowed_methods_and_the_document_lists_errors_sent(engine, serve_app):
    base = serve_app(create_app(engine))
    r = httpx.get(f"{base}/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    # A path two routes serve: the 405 names both methods, not only the first route's.
    assert httpx.put(f"{base}/v1/responses/resp_1").headers["allow"] == "GET, DELETE"
    responses = httpx.get(f"{base}/openapi.json").json()["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in responses
    assert {"400", "401", "404", "413", "429", "500", "503"} <= set(responses)


def test_the_document_requires_the_key_only_when_the_server_has_one(engine):
    def security(app):
        document = app.openapi()
        post = document["paths"]["/v1/chat/completions"]["post"]
        return post.get("security"), document.get("components", {}).get("securitySchemes")

    assert security(create_app(engine)) == (None, None)
    assert security(create_app(engine, api_key=KEY)) == (
        [{"HTTPBearer": []}, {"APIKeyHeader": []}],  # either one: a bearer token or Anthropic's x-api-key
        {
            "HTTPBearer": {"type": "http", "scheme": "bearer"},
            "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        },
    )


@pytest.mark.anyio
async def test_overload_is_answered_429_with_retry_after_and_accepted_requests_complete():
    engine = start_engine(EngineArgs(cache_tokens=64 * 64, max_num_seqs=2, max_waiting_requests=2))
    try:
        app = create_app(engine)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            payload = {"model": engine.model_name, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
            responses = await asyncio.gather(
                *[client.post("/v1/chat/completions", json=payload) for _ in range(20)]  # 10 x max_num_seqs
            )
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 429}, statuses
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"].isdigit()
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
            else:
                assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert statuses.count(200) >= 4
    finally:
        engine.shutdown()


# With an API key, as the document declares the bearer scheme on /v1.
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(FakeEngine(model_name=MODEL, max_model_len=512), api_key=KEY)
)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_5xx_and_match_the_document(case):
    response = case.call(headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code < 500, response.text
    # Every document-valid body is not a servable one (a context limit, a stop string the model
    # cannot see): the fuzz checks status codes, content types, bodies and headers, not acceptance.
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
