"""`python -m server` stops the way launchd stops it: SIGTERM ends every live stream, then exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from support import RemoteServer
from support.sse import finish_reason, iter_sse

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

# `python -m server` with the engine factory's start_engine swapped for the FakeEngine: fast, and a
# stream of N words takes N * 50 ms.
FAKE_SERVER = """
import sys
import server.engine.factory
from support.fake_engine import FakeEngine
server.engine.factory.start_engine = lambda args, group=None: FakeEngine(model_name="mla-demo", token_delay=0.05)
from server.cli import main
sys.exit(main(sys.argv[1:]))
"""

STREAMS = 3
# No stream can end before the signal, so every one must end with an error event:
# - the fake echoes 400+ words at 50 ms each: 20 s of output;
# - the demo model decodes greedily with EOS banned (logit_bias) and no max_tokens, so only the
#   context (32K tokens) would end it.
FAKE_WORDS = 400


def demo_eos_id() -> int:
    from server.engine.model.demo_model import ensure_demo_model

    return int(json.loads((ensure_demo_model() / "generation_config.json").read_text())["eos_token_id"])


def start(engine: str, log) -> RemoteServer:
    args = ["--log-level", "warning"]
    return (
        RemoteServer(args, log_path=log) if engine == "demo" else RemoteServer(args, program=FAKE_SERVER, log_path=log)
    )


class Stream(threading.Thread):
    """One streamed chat completion; `events` collects every SSE payload as it arrives."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list = []
        self.flowing = threading.Event()  # role chunk and first content chunk arrived
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=60) as response:
                for event in iter_sse(response.iter_lines()):
                    self.events.append(event)
                    if len(self.events) >= 2:
                        self.flowing.set()
        except BaseException as e:
            self.error = e
        finally:
            self.flowing.set()

    def finished_normally(self) -> bool:
        return any(finish_reason(e) for e in self.events)


def stream_body(engine: str, i: int) -> dict:
    body: dict = {"model": "mla-demo", "stream": True}
    if engine == "fake":
        words = " ".join(f"w{k}" for k in range(FAKE_WORDS + i))
        return {**body, "max_tokens": 2000, "messages": [{"role": "user", "content": words}]}
    words = " ".join(f"w{k}" for k in range(5 + i))
    return {
        **body,
        "temperature": 0,
        "logit_bias": {str(demo_eos_id()): -100},
        "messages": [{"role": "user", "content": words}],
    }


@pytest.mark.parametrize(
    "engine, sig",
    [("fake", signal.SIGTERM), ("fake", signal.SIGINT), ("demo", signal.SIGTERM)],
    ids=["fake-SIGTERM", "fake-SIGINT", "demo-SIGTERM"],
)
def test_signal_ends_live_streams_and_exits_0(tmp_path, engine, sig):
    log = tmp_path / "server.log"
    with start(engine, log) as server:
        url = server.url_for("v1", "chat/completions")
        streams = [Stream(url, stream_body(engine, i)) for i in range(STREAMS)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.flowing.wait(60)
            assert s.error is None, s.error
        assert not any(s.finished_normally() for s in streams), "a stream ended before the signal"

        signalled = time.monotonic()
        server.send_signal(sig)
        assert server.wait(timeout=30) == 0, log.read_text()
        exit_seconds = time.monotonic() - signalled
        for s in streams:
            s.join(timeout=10)
            assert not s.is_alive() and s.error is None, s.error
            # cut short: the last event before [DONE] says why, in OpenAI's error shape
            assert s.events[-1] == "[DONE]", s.events[-3:]
            assert set(s.events[-2]) == {"error"}, s.events[-3:]
            assert not s.finished_normally(), s.events[-3:]
        assert exit_seconds < 10
        assert "Traceback" not in log.read_text()


def test_sigterm_while_idle_exits_0(tmp_path):
    log = tmp_path / "server.log"
    with start("fake", log) as server:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0, log.read_text()
