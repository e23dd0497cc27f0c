"""Shared fixtures: a real uvicorn server for any ASGI app, on a free local port, in this process.

(A server in a child process, `python -m server` or a program, is `support.RemoteServer`.)

The prefix cache's disk tier is off in tests unless a test turns it on, and never writes under the
user's cache directory: a test's cached-token counts must not depend on what an earlier test or
run left on disk (`disk_tier_off`, and the environment its child servers inherit)."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from support import wait_until
from support.fake_engine import FakeEngine

from server.api.app import create_app
from server.engine import EngineArgs
from server.engine.async_engine import AsyncEngine
from server.engine.factory import start_engine
from server.engine.types import EngineClient

_DISK_TIER_DIR = tempfile.mkdtemp(prefix="mla-test-disk-tier-")
os.environ["MLA_SERVER_DISK_CACHE_DIR"] = _DISK_TIER_DIR  # child servers (`support.RemoteServer`)
os.environ["MLA_SERVER_DISK_CACHE_BYTES"] = "0"


@pytest.fixture(autouse=True, scope="session")
def disk_tier_off() -> Iterator[None]:
    """In-process engines: the tier's defaults, off and in a temporary directory; an engine whose
    arguments set `disk_cache_bytes` and `disk_cache_dir` has one."""
    from server.engine import factory

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(factory, "default_directory", lambda: Path(_DISK_TIER_DIR))
        mp.setattr(factory, "default_max_bytes", lambda directory: 0)
        yield


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
def engine() -> FakeEngine:
    """The fake engine behind `client` (a module may define its own `engine` instead)."""
    return FakeEngine(model_name="fake-model", max_model_len=64)


@pytest.fixture
async def client(engine: EngineClient) -> AsyncIterator[httpx.AsyncClient]:
    """The app over `engine`, called in process through httpx's ASGI transport."""
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.fixture(scope="session")
def demo_engine() -> Iterator[AsyncEngine]:
    """The real engine on the demo model, loaded once for every test that serves it over HTTP."""
    engine = start_engine(EngineArgs(cache_tokens=64 * 512, max_num_seqs=64))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def random_engine() -> Iterator[AsyncEngine]:
    """The real engine on the random demo model (`ensure_demo_model(random=True)`), for tests that
    want its flat distributions (e.g. sampled tokens that hold part of a character)."""
    from server.engine.model.demo_model import ensure_demo_model

    engine = start_engine(EngineArgs(model=str(ensure_demo_model(random=True)), cache_tokens=64 * 128, max_num_seqs=16))
    yield engine
    engine.shutdown()


@pytest.fixture
def serve_engine(serve_app: Callable[..., str]) -> Callable[..., str]:
    """`serve_engine(engine, **create_app_options)`: `create_app(engine)` behind uvicorn; returns
    the base URL ending in /v1. The engine outlives the app (a shared engine serves many tests)."""

    def serve(engine: EngineClient, **options: object) -> str:
        app = create_app(engine, **options)  # type: ignore[arg-type]
        app.router.lifespan_context = _engine_outlives_app
        return serve_app(app) + "/v1"

    return serve


@asynccontextmanager
async def _engine_outlives_app(app: object) -> AsyncIterator[None]:
    yield


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (`@pytest.mark.anyio`) run on asyncio, as uvicorn does."""
    return "asyncio"


# Fixtures that load the real model: a test using one is slow (`pytest -m "not slow"` skips it).
_MODEL_FIXTURES = frozenset({"demo_engine", "random_engine"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
