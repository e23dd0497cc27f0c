"""Start a server under test as a child process, wait for its health, track its peak memory, stop it."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_port_block(count: int) -> int:
    """First of `count` consecutive local ports that are free now, chosen below the kernel's
    ephemeral range: ports from `free_port` lie inside it, where Linux hands the neighbours of a
    bound port to outgoing connections (the likely cause of a ring rank's `Couldn't bind socket
    (error: 98)` in CI: rank 1 binds the port after rank 0's), while none is given a port below it."""
    low = 10000
    ephemeral_start = _ephemeral_range()[0]
    for _ in range(200):
        first = random.randrange(low, ephemeral_start - count)
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports between {low} and {ephemeral_start}")


def _ephemeral_range() -> tuple[int, int]:
    try:
        first, last = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(first), int(last)
    except OSError:
        return 49152, 65535  # IANA's dynamic range, which macOS uses


def rss_bytes(pid: int) -> tuple[int | None, int | None]:
    """(current, peak) resident set size of `pid`: /proc's VmRSS/VmHWM on Linux; elsewhere
    `ps -o rss` gives only the current value, so callers poll it for a peak."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        fields = {}
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields.get("VmRSS"), fields.get("VmHWM")
    try:
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip()) * 1024, None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None, None


def session_pids(leader: int) -> list[int]:
    """Every live process of the session `leader` started (Linux /proc; elsewhere only `leader`):
    a server launched as several ranks (mlx.launch) is that whole set."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the command's closing parenthesis: state, ppid, pgrp, session, ...
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == leader:
            pids.append(int(stat.parent.name))
    return pids or [leader]


class ServerProcess:
    """A server command run in its own process group, output to `log_path`.

    `peak_rss` is the largest resident size seen: the kernel's high-water mark where it keeps one,
    else the largest of samples taken every `sample_s` seconds.
    """

    def __init__(self, argv: list[str], base_url: str, log_path: Path, sample_s: float = 0.25):
        self.argv, self.base_url, self.log_path, self.sample_s = argv, base_url.rstrip("/"), log_path, sample_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss: int | None = None
        self._stop_sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _running(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("the server process has not been started")
        return self.proc

    def _sample(self) -> None:
        while not self._stop_sampling.is_set() and self._running().poll() is None:
            self._sample_once()
            self._stop_sampling.wait(self.sample_s)

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll GET /health (at the server root, above /v1) until 200; raise with the log's tail if
        the process exits or time runs out."""
        root = self.base_url.removesuffix("/v1")
        proc = self._running()
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"{self.argv[:4]} exited with {proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(f"{root}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"{self.argv[:4]} not healthy after {timeout_s:.0f}s:\n{self.log_tail()}")

    def health(self) -> dict[str, Any] | None:
        """The /health JSON, where the server returns one."""
        try:
            resp = httpx.get(f"{self.base_url.removesuffix('/v1')}/health", timeout=5.0, trust_env=False)
            body = resp.json() if resp.status_code == 200 else None
            return body if isinstance(body, dict) else None
        except (httpx.HTTPError, ValueError):
            return None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout_s`; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._sample_once()
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # mlx.launch may die before its ranks, which sit in process groups of their own: end what
        # is left of the session, so that no rank outlives a benchmark or a test.
        for pid in session_pids(self.proc.pid):
            if pid != self.proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._stop_sampling.set()
        if self._sampler is not None:
            self._sampler.join()
        return self.proc.returncode

    def _sample_once(self) -> None:
        """One sample of the peak: one process's own high-water mark, or, for several processes (a
        tensor-parallel set), the sum of their current sizes (their high-water marks need not
        coincide in time)."""
        sizes = [rss_bytes(pid) for pid in session_pids(self._running().pid)]
        if len(sizes) == 1:
            candidates = list(sizes[0])
        else:
            candidates = [sum(current for current, _ in sizes if current is not None)]
        self.peak_rss = max((v for v in (*candidates, self.peak_rss) if v), default=None)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def python_module(module: str, *args: str) -> list[str]:
    """argv running `module` with this interpreter (the project's environment)."""
    return [sys.executable, "-m", module, *args]


def mlx_launch(ranks: int) -> list[str]:
    """argv prefix starting `ranks` processes of a command through MLX's launcher on this machine.

    The backend is mlx.launch's own choice (nccl where CUDA is available, else ring); the ports
    are free ones outside the ephemeral range (the ring binds one per rank from the starting port)."""
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or shutil.which("mlx.launch")
    if launcher is None:
        raise RuntimeError("mlx.launch is not installed beside this Python")
    first = free_port_block(ranks + 1)  # the ring's ports, then NCCL's rendezvous
    return [launcher, "-n", str(ranks), "--starting-port", str(first), "--nccl-port", str(first + ranks), "--"]
