"""`python -m server` stops the way launchd stops it: SIGTERM ends every live stream, then exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent

# `python -m server` with the engine factory's start_engine swapped for the FakeEngine: fast, and every stream stays
# live for as long as the test needs (one word every 50 ms).
FAKE_SERVER = """
import sys
import server.engine.factory
from tests.fake_engine import FakeEngine
server.engine.factory.start_engine = lambda args: FakeEngine(model_name="mla-demo", token_delay=0.05)
from server.cli import main
sys.exit(main(sys.argv[1:]))
"""

STREAMS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine: str, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "server"] if engine == "demo" else [sys.executable, "-c", FAKE_SERVER]
    with open(log, "w") as out:
        return subprocess.Popen(
            [*command, "--port", str(port), "--log-level", "warning"], cwd=REPO, stdout=out, stderr=out
        )


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited during startup"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not become healthy")


class Stream(threading.Thread):
    """One streamed chat completion; `data` collects every SSE data payload."""

    def __init__(self, base: str, words: int) -> None:
        super().__init__(daemon=True)
        self.base, self.words = base, words
        self.data: list[str] = []
        self.flowing = threading.Event()  # role chunk and first content chunk arrived
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {
            "model": "mla-demo",
            "stream": True,
            "max_tokens": 2000,
            "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(self.words))}],
        }
        try:
            with httpx.stream("POST", f"{self.base}/v1/chat/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.data.append(line[len("data: ") :])
                        if len(self.data) >= 2:
                            self.flowing.set()
        except BaseException as e:
            self.error = e
        finally:
            self.flowing.set()

    def finished_normally(self) -> bool:
        return any(_finish_reason(d) for d in self.data)


def _finish_reason(payload: str) -> str | None:
    if payload == "[DONE]":
        return None
    choices = json.loads(payload).get("choices") or [{}]
    return choices[0].get("finish_reason")


@pytest.mark.parametrize(
    "engine, sig",
    [("fake", signal.SIGTERM), ("fake", signal.SIGINT), ("demo", signal.SIGTERM)],
    ids=["fake-SIGTERM", "fake-SIGINT", "demo-SIGTERM"],
)
def test_signal_ends_live_streams_and_exits_0(tmp_path, engine, sig):
    port, log = free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    proc = start_server(engine, port, log)
    try:
        wait_healthy(proc, base, timeout=120)
        # The fake echoes the prompt's words, so a long prompt is a long stream; the demo model
        # generates until max_tokens or a chance EOS, and prefills short prompts fastest.
        words = 400 if engine == "fake" else 5
        streams = [Stream(base, words + i) for i in range(STREAMS)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.flowing.wait(60)
        live = [s for s in streams if not s.finished_normally()]
        if engine == "fake":
            assert len(live) == STREAMS
        assert live, "every stream finished before the signal; nothing was tested"

        signalled = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, log.read_text()
        exit_seconds = time.monotonic() - signalled
        for s in streams:
            s.join(timeout=10)
            assert not s.is_alive() and s.error is None, s.error
            assert s.data[-1] == "[DONE]"
        for s in live:
            # the stream was cut short: its last event before [DONE] says why, in OpenAI's error shape
            assert "error" in json.loads(s.data[-2]), s.data[-3:]
        assert exit_seconds < 10
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_while_idle_exits_0(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    proc = start_server("fake", port, log)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", timeout=60)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
