"""One subprocess server fixture: `python -m server` (or a given python program) on a free port.

Modelled on vLLM's `RemoteOpenAIServer` (tests/utils.py): a context manager that starts the
server, waits for GET /health, hands out URLs and an OpenAI client, and stops it with SIGTERM.
The process handling itself (its own process group, a log file, health polling, SIGTERM then
SIGKILL) is the benchmark's `server.bench.servers.ServerProcess`; this adds what tests need.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path
from types import TracebackType

import openai

from server.bench.servers import ServerProcess, free_port, python_module

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"

# Prepended to a `program`: the repo and tests/ importable (`support.fake_engine`)
# whatever directory pytest runs from.
_PATHS = f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(TESTS)!r}]\n"


class RemoteServer:
    """`with RemoteServer(["--log-level", "warning"]) as server: server.get_client()...`

    `args` go to `python -m server`, or, with `program`, to `python -c program` (whose
    `sys.argv[1:]` they become); `--port <port>` is appended unless `add_port=False`, in which
    case the program finds its port in `sys.argv` wherever `args` put `server.port`.
    The server's output goes to `log_path` (a temporary file unless given); `log_text()` reads it.
    """

    def __init__(
        self,
        args: list[str] | None = None,
        *,
        program: str | None = None,
        port: int | None = None,
        add_port: bool = True,
        log_path: Path | None = None,
        startup_timeout: float = 120.0,
        api_key: str = "unused",
    ) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.api_key = api_key
        self.startup_timeout = startup_timeout
        args = list(args or [])
        if add_port:
            args += ["--port", str(self.port)]
        argv = python_module("server", *args) if program is None else [sys.executable, "-c", _PATHS + program, *args]
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if log_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="remote-server-")
            log_path = Path(self._tmp.name) / "server.log"
        self.log_path = log_path
        self.process = ServerProcess(argv, self.url_root, log_path)

    # -- lifetime ----------------------------------------------------------------------------------
    def __enter__(self) -> RemoteServer:
        self.process.start()
        try:
            self.process.wait_healthy(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server (SIGKILL after `timeout`); its exit status. Idempotent."""
        code = self.process.stop(timeout)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server process itself (not its group), as launchd or a terminal would."""
        self._proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the server to exit on its own; its exit status."""
        return self._proc.wait(timeout)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def _proc(self):  # type: ignore[no-untyped-def]
        if self.process.proc is None:
            raise RuntimeError("the server was not started")
        return self.process.proc

    # -- addresses and clients ---------------------------------------------------------------------
    @property
    def url_root(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_for(self, *parts: str) -> str:
        """`url_for("v1", "chat/completions")` -> "http://127.0.0.1:PORT/v1/chat/completions"."""
        return "/".join([self.url_root, *(p.strip("/") for p in parts)])

    def get_client(self, **kwargs: object) -> openai.OpenAI:
        """The official SDK against /v1, without retries (a failure shows at once)."""
        options: dict[str, object] = {"base_url": self.url_for("v1"), "api_key": self.api_key, "max_retries": 0}
        options.update(kwargs)
        return openai.OpenAI(**options)  # type: ignore[arg-type]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
