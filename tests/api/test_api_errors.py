"""Every failure becomes one HTTP status and one OpenAI error object (server/api/errors.py), and
the body-size and host guard (server/api/guard.py): statuses, types, codes, params and headers
for each engine error kind, the field a validation error names, and the 413 boundary."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.exceptions import HTTPException

from server.api.errors import APIError, to_api_error
from server.api.guard import BodySizeLimit, default_allowed_hosts, default_max_request_bytes
from server.engine.types import (
    EngineError,
    EngineOverloaded,
    EngineShutdown,
    InvalidRequest,
    PromptTooLong,
    RequestTimeout,
)

MODEL = "fake-model"


def shape(error: APIError) -> tuple[int, str, str | None, str | None]:
    info = error.body()["error"]
    assert set(info) == {"message", "type", "param", "code"}
    return error.status, info["type"], info["param"], info["code"]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            PromptTooLong("too long", param="max_tokens"),
            (400, "invalid_request_error", "max_tokens", "context_length_exceeded"),
        ),
        (PromptTooLong("too long"), (400, "invalid_request_error", "messages", "context_length_exceeded")),
        (InvalidRequest("bad"), (400, "invalid_request_error", None, None)),
        (InvalidRequest("bad", param="tools"), (400, "invalid_request_error", "tools", None)),
        (EngineOverloaded("busy"), (429, "requests", None, "rate_limit_exceeded")),
        (RequestTimeout("slow"), (503, "server_error", None, "timeout")),
        (EngineShutdown("bye"), (503, "server_error", None, None)),
        (EngineError("broke"), (503, "server_error", None, None)),
        (RuntimeError("secret detail"), (500, "server_error", None, None)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else "",
)
def test_each_engine_error_kind_has_its_status_type_param_and_code(exc, expected):
    error = to_api_error(exc)
    assert shape(error) == expected
    if expected[0] != 500:
        assert error.info.message == str(exc)  # the engine's words reach the client
    else:
        assert error.info.message == "internal server error"  # an unexpected error's text does not


def test_an_overloaded_server_asks_for_a_retry_after_one_second_and_a_timeout_asks_for_none():
    assert to_api_error(EngineOverloaded("busy")).headers == {"Retry-After": "1"}
    assert to_api_error(RequestTimeout("slow")).headers == {"x-should-retry": "false"}
    assert to_api_error(EngineError("x")).headers == {}


def test_an_engine_error_without_words_still_says_something():
    assert to_api_error(EngineError("")).info.message == "the engine could not serve this request"


def test_an_api_error_passes_through_unchanged():
    error = APIError(404, "gone", code="model_not_found")
    assert to_api_error(error) is error


@pytest.mark.parametrize(
    ("status", "kind"), [(404, "invalid_request_error"), (405, "invalid_request_error"), (502, "server_error")]
)
def test_http_exceptions_keep_their_status_and_headers(status, kind):
    error = to_api_error(HTTPException(status, headers={"Allow": "GET"}))
    assert (error.status, error.info.type, error.headers) == (status, kind, {"Allow": "GET"})
    assert error.info.message  # the status phrase when there is no detail
    assert to_api_error(HTTPException(status, detail="why")).info.message == "why"


def test_a_message_with_a_lone_surrogate_is_still_utf8():
    error = APIError(400, "bad \ud800 input")
    assert json.loads(error.response().body)["error"]["message"] == "bad \\ud800 input"


def chat_body(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (chat_body(messages=[{"role": "user", "content": 5}]), "messages[0].content", "must be a string or a list"),
        (chat_body(messages=[{"role": "user"}]), "messages[0]", "needs content"),
        ({"model": MODEL}, "messages", "field required"),
        (chat_body(temperature=9), "temperature", "less than or equal to 2"),
        (chat_body(stop=["ok", ""]), "stop", ""),
    ],
)
async def test_a_validation_error_names_the_first_bad_field_in_param_and_message(client, body, param, says):
    r = await client.post("/v1/chat/completions", json=body)
    error = r.json()["error"]
    assert (r.status_code, error["type"], error["param"], error["code"]) == (400, "invalid_request_error", param, None)
    assert error["message"].startswith(f"{param}: ") and says in error["message"]
    assert "Value error" not in error["message"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("content", "headers", "says"),
    [
        ('{"model": ', {"content-type": "application/json"}, "invalid JSON body: "),
        ("[1, 2]", {"content-type": "application/json"}, "the request body must be a JSON object: "),
        ("model=x", {"content-type": "text/plain"}, "'Content-Type: application/json'"),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_a_400_without_param(client, content, headers, says):
    r = await client.post("/v1/chat/completions", content=content, headers=headers)
    error = r.json()["error"]
    assert (r.status_code, error["param"], error["code"]) == (400, None, None)
    assert error["message"].startswith(says) or says in error["message"]


@pytest.mark.anyio
async def test_an_unknown_route_is_a_404_error_object(client):
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


# The guard, as ASGI: what reaches the app, what is refused.


def guarded(limit: int):
    seen: list[bytes] = []

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return BodySizeLimit(app, limit), seen


def call(middleware, chunks: list[bytes], content_length: str | None = None, kind: str = "http"):
    headers = [] if content_length is None else [(b"content-length", content_length.encode())]
    scope = {"type": kind, "method": "POST", "path": "/", "headers": headers}
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_of_exactly_the_limit_passes_whole_and_one_byte_more_is_a_413(declared):
    middleware, seen = guarded(10)
    chunks = [b"12345", b"67890"]
    assert call(middleware, chunks, "10" if declared else None) == (200, b"ok")
    assert seen == [b"1234567890"]
    status, body = call(middleware, [*chunks, b"x"], "11" if declared else None)
    error = json.loads(body)["error"]
    assert status == 413 and error["code"] == "request_too_large" and "10 bytes" in error["message"]
    assert len(seen) == 1  # the app never saw it


def test_a_lying_content_length_is_checked_against_the_bytes_that_come():
    middleware, seen = guarded(4)
    assert call(middleware, [b"12345678"], "2")[0] == 413
    assert call(middleware, [b"123"], "abc") == (200, b"ok") and seen == [b"123"]


def test_non_http_traffic_passes_the_guard_untouched():
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["type"])

    asyncio.run(BodySizeLimit(app, 0)({"type": "lifespan"}, None, None))
    assert reached == ["lifespan"]


def test_the_default_body_limit_holds_a_full_context():
    assert default_max_request_bytes(0) == 1 << 20
    assert default_max_request_bytes(1000) == (1 << 20) + 64_000


@pytest.mark.parametrize(
    ("bind", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("example.org", False),
    ],
)
def test_only_a_loopback_server_restricts_the_host_header(bind, loopback):
    assert default_allowed_hosts(bind) == (["localhost", "127.0.0.1", "[::1]"] if loopback else None)
