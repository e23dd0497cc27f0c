"""Run the server for one `Settings`: claim the port, load the engine, serve HTTP until a signal.

On SIGTERM (how launchd stops a job) or SIGINT the engine ends its live generations first, so
every open stream gets its final event and closes; then uvicorn drains and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import logging.handlers
import os
import signal
import socket
import sys
from collections.abc import Iterator
from functools import partial
from types import FrameType
from typing import Any

import h11
import mlx.core as mx
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.app import create_app
from server.api.guard import default_allowed_hosts
from server.config import PROG, Settings
from server.engine import factory
from server.engine.types import EngineClient, EngineError

log = logging.getLogger(__name__)

# Streams still open this long after a signal are cut, safely inside launchd's ExitTimeOut
# (deploy/templates/agent.plist) after which the process would be killed outright.
GRACEFUL_SHUTDOWN_S = 20


def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean stop, 1 when the port or the model is unusable."""
    try:
        _configure_logging(settings)
    except OSError as e:
        print(f"{PROG}: cannot open the log file {settings.log_file}: {e.strerror or e}", file=sys.stderr)
        return 1
    group = _distributed_group()
    args = settings.engine_args()
    if group is not None and group.rank() != 0:
        # Ranks other than 0 serve no HTTP: they run rank 0's steps on their shard.
        log.info("rank %d of %d: loading %s", group.rank(), group.size(), args.model or "the demo model")
        try:
            factory.follow(args, group)
        except EngineError as e:
            print(f"{PROG}: rank {group.rank()}: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        sock = _claim_port(settings.host, settings.port)
    except OSError as e:
        print(f"{PROG}: {_port_problem(settings.host, settings.port, e)}", file=sys.stderr)
        return 1
    with sock:
        log.info("loading %s", args.model or "the embedded demo model")
        try:
            engine = factory.start_engine(args, group)
        except EngineError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 1
        try:
            app = create_app(
                engine,
                api_key=settings.api_key,
                max_request_bytes=settings.max_request_bytes,
                allowed_hosts=allowed_hosts(settings),
                cors_origins=_names(settings.cors_origins) or None,
                max_n=settings.max_n,
            )
            config = uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level,
                log_config=None,  # keep the root logger's format set above
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                # uvicorn calls what it is given as a protocol class; a partial is one to it.
                http=partial(HeadTimeoutH11Protocol, head_timeout=settings.header_timeout),  # type: ignore[arg-type]
            )
            server = _Server(config, engine)
            server.run(sockets=[sock])
        finally:
            engine.shutdown()
    # Not 0 when a tensor-parallel rank failed: launchd restarts the whole set.
    return 0 if server.started and not engine.failed else 1


def _distributed_group() -> mx.distributed.Group | None:
    """The tensor-parallel group when `mlx.launch` started this process as one of several ranks."""
    if not any(name in os.environ for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK")):
        return None
    group = mx.distributed.init()
    if group.size() < 2:
        return None
    log.info("tensor parallel: rank %d of %d", group.rank(), group.size())
    return group


def allowed_hosts(settings: Settings) -> list[str] | None:
    """The Host names to answer: loopback names when bound to loopback, plus --allowed-hosts."""
    extra = _names(settings.allowed_hosts)
    default = default_allowed_hosts(settings.host)
    if default is None:
        return extra or None
    return default + extra


def _names(option: str | None) -> list[str]:
    """A comma-separated option as a list."""
    return [name.strip() for name in (option or "").split(",") if name.strip()]


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is not complete within
    `head_timeout` seconds (slowloris). It covers a new connection and a kept-alive one that has
    started its next request; an idle kept-alive connection is uvicorn's `timeout_keep_alive`,
    and a slow body is bounded by the request timeout once the route reads it."""

    def __init__(self, *args: Any, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()  # part of a head has arrived, or none yet
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def _configure_logging(settings: Settings) -> None:
    # WatchedFileHandler reopens the file once newsyslog has renamed it (deploy/templates/newsyslog.conf).
    handler = logging.handlers.WatchedFileHandler(settings.log_file) if settings.log_file else logging.StreamHandler()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[handler],
        force=True,
    )


def _claim_port(host: str, port: int) -> socket.socket:
    """Bind now, listen later: a taken port fails before the model loads, and clients get
    'connection refused' rather than a hang while it does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that name it, and streamed
    # tokens would otherwise wait on Nagle + delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _port_problem(host: str, port: int, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is already in use (see who holds it: lsof -nP -iTCP:{port} -sTCP:LISTEN); "
            "stop that process or choose another --port"
        )
    return f"cannot listen on {host}:{port}: {e.strerror or e}"


class _Server(uvicorn.Server):
    """uvicorn's server, made to end the engine's streams on a signal and to exit 0 afterwards."""

    def __init__(self, config: uvicorn.Config, engine: EngineClient) -> None:
        super().__init__(config)
        self._engine = engine

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            # uvicorn waits for open connections before its lifespan shutdown, so streams must be
            # ended here or it would wait forever. Run on the loop, not inside the signal handler,
            # where the engine's locks may be held by the very code this signal interrupted.
            asyncio.get_running_loop().call_soon_threadsafe(self._engine.shutdown)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own version re-raises the signal after a graceful stop, which would turn a
        # clean SIGTERM into a death by signal; launchd must see exit status 0.
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
