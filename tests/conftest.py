"""Shared fixtures: a real uvicorn server for any ASGI app, on a free local port, in this process.

(A server in a child process, `python -m server` or a program, is `support.RemoteServer`.)"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import uvicorn
from support import wait_until


@pytest.fixture
def serve_app() -> Iterator[Callable[..., str]]:
    """`serve_app(app)` starts uvicorn in a thread and returns its base URL ("http://127.0.0.1:PORT").

    Lifespan runs; every server is stopped (its lifespan shutdown included) when the test ends.
    """
    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def serve(app, **config) -> str:
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets that say so, and
        # without it Nagle + delayed ACKs add ~40 ms to every keep-alive response.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))  # the OS picks the port; keeping the socket means no race
        config = {"log_level": "warning", "timeout_graceful_shutdown": 5, **config}
        server = uvicorn.Server(uvicorn.Config(app, **config))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread))
        if not wait_until(lambda: server.started or not thread.is_alive(), timeout=10) or not server.started:
            raise RuntimeError("uvicorn did not start")
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield serve
    for server, _ in running:
        server.should_exit = True
    for _, thread in running:
        thread.join(timeout=10)


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (`@pytest.mark.anyio`) run on asyncio, as uvicorn does."""
    return "asyncio"
