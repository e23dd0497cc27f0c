"""A long prefill does not leave a stream silent: a stream of one choice starts after
`STREAM_START_S` without its first token, and keeps the connection alive with pings (Anthropic's
`ping` event on /v1/messages), while a refusal is still a plain JSON error."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from support.fake_engine import FakeEngine

from server.api import generation, sse
from server.api.app import create_app

MODEL = "fake-model"
PREFILL_S = 1.5


@pytest.fixture
def base(serve_app, monkeypatch):
    monkeypatch.setattr(generation, "STREAM_START_S", 0.1)
    monkeypatch.setattr(sse, "PING_S", 0.2)
    return serve_app(create_app(FakeEngine(model_name=MODEL, max_model_len=64, first_delay=PREFILL_S)))


def timed_lines(url: str, body: dict) -> tuple[list[tuple[float, str]], int]:
    """Each non-empty line of a streamed response with the seconds since the request."""
    t0 = time.monotonic()
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        return [(time.monotonic() - t0, line) for line in r.iter_lines() if line], r.status_code


def test_a_chat_stream_starts_before_its_first_token_and_keeps_every_token(base):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "one two three"}], "stream": True}
    lines, status = timed_lines(f"{base}/v1/chat/completions", body)
    assert status == 200
    first_data = next(t for t, line in lines if line.startswith("data:"))
    assert first_data < PREFILL_S / 2  # the role chunk came while the prefill ran
    assert any(line.startswith(":") for _, line in lines)  # a keep-alive comment while nothing else came
    chunks = [json.loads(line[5:]) for _, line in lines if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "one two three"


def test_a_messages_stream_pings_with_anthropic_events_until_its_first_token(base):
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi there"}], "stream": True}
    lines, status = timed_lines(f"{base}/v1/messages", body)
    events = [line.removeprefix("event: ") for _, line in lines if line.startswith("event:")]
    assert status == 200
    assert events.index("ping") < events.index("message_start")  # pinged while the prefill ran
    assert events[-1] == "message_stop"


def test_a_refused_stream_is_still_a_json_error(base):
    long = " ".join(["word"] * 100)  # beyond the fake engine's 64-token context
    body = {"model": MODEL, "messages": [{"role": "user", "content": long}], "stream": True}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
