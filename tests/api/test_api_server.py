"""The API over a real socket: uvicorn in a thread, the official openai SDK, client disconnects."""

from __future__ import annotations

import httpx
import openai
import pytest
from support import RemoteServer, free_port, wait_until
from support.fake_engine import FakeEngine
from support.sse import iter_sse

from server.api.app import create_app

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

MODEL = "fake-model"
HELLO = [{"role": "user", "content": "hello there world"}]
LONG = [{"role": "user", "content": " ".join(f"w{i}" for i in range(500))}]


def sdk(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=10)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(model_name=MODEL)


def test_sdk_completion(serve_app, engine):
    completion = sdk(serve_app(create_app(engine))).chat.completions.create(model=MODEL, messages=HELLO)
    assert completion.choices[0].message.content == "hello there world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 4 and completion.usage.total_tokens == 8
    assert completion.usage.prompt_tokens_details.cached_tokens == 0


def test_sdk_stream_with_usage(serve_app, engine):
    stream = sdk(serve_app(create_app(engine))).chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello there world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_stop_strings_and_length(serve_app, engine, stream):
    client = sdk(serve_app(create_app(engine)))

    def text_and_finish(**kwargs) -> tuple[str, str]:
        result = client.chat.completions.create(model=MODEL, messages=HELLO, stream=stream, **kwargs)
        if not stream:
            return result.choices[0].message.content, result.choices[0].finish_reason
        chunks = [c.choices[0] for c in result if c.choices]
        return "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason

    assert text_and_finish(stop=["ere w", "nope"]) == ("hello th", "stop")
    assert text_and_finish(stop="world") == ("hello there ", "stop")
    assert text_and_finish(max_tokens=2) == ("hello there", "length")
    assert text_and_finish(max_completion_tokens=1) == ("hello", "length")


def test_sdk_sees_typed_errors(serve_app, engine):
    base = serve_app(create_app(engine, api_key="sekret"))
    with pytest.raises(openai.AuthenticationError):
        sdk(base, "wrong").chat.completions.create(model=MODEL, messages=HELLO)
    client = sdk(base, "sekret")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=0)
    assert e.value.param == "max_tokens"
    assert [m.id for m in client.models.list()] == [MODEL]


def test_sdk_raises_on_a_mid_stream_engine_failure(serve_app):
    client = sdk(serve_app(create_app(FakeEngine(model_name=MODEL, fail_after=1))))
    with pytest.raises(openai.APIError, match="on purpose"):
        list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))


def test_stream_disconnect_cancels_the_engine_request(serve_app):
    engine = FakeEngine(model_name=MODEL, token_delay=0.02)
    base = serve_app(create_app(engine))
    body = {"model": MODEL, "messages": LONG, "stream": True}
    with httpx.Client(timeout=5) as client, client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        assert next(iter_sse(r.iter_lines()))
    assert wait_until(lambda: len(engine.cancelled) == 1), "engine request not cancelled"
    assert engine.cancelled == [engine.requests[0][0]] and engine.finished == []


def test_non_streaming_disconnect_cancels_the_engine_request(serve_app):
    engine = FakeEngine(model_name=MODEL, token_delay=0.02)
    base = serve_app(create_app(engine))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": LONG}, timeout=0.3)
    assert wait_until(lambda: len(engine.cancelled) == 1), "engine request not cancelled"
    assert engine.finished == []


# Plain uvicorn, not server/serve.py: the app's own shutdown path, whatever runs it.
SERVER = """
import sys, uvicorn
from support.fake_engine import FakeEngine
from server.api.app import create_app
engine = FakeEngine(model_name="fake-model", token_delay=0.02)
uvicorn.run(create_app(engine), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def test_sigterm_ends_every_stream_with_done():
    """Under plain uvicorn too (not only server/serve.py): a SIGTERM ends live streams with an
    error event and [DONE]."""
    port = free_port()
    with RemoteServer([str(port)], program=SERVER, port=port, add_port=False, startup_timeout=20) as server:
        body = {"model": MODEL, "messages": LONG, "stream": True}
        url = server.url_for("v1", "chat/completions")
        with httpx.Client(timeout=10) as client, client.stream("POST", url, json=body) as response:
            events = iter_sse(response.iter_lines())
            assert next(events)
            server.send_signal()
            rest = list(events)
        assert rest[-1] == "[DONE]"
        assert rest[-2]["error"]["type"] == "server_error"
        # uvicorn.run re-raises the signal once it has drained, so the status is -SIGTERM here.
        server.wait(timeout=10)
