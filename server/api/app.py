"""The FastAPI application: routes, auth, and the engine's lifetime.

`create_app(engine)` is all a launcher needs; the engine is reached through dependencies so that
tests can hand in any EngineClient (tests/fake_engine.py).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.middleware.trustedhost import TrustedHostMiddleware

from server.api.errors import ERROR_RESPONSES, APIError, install_error_handlers
from server.api.guard import BodySizeLimit, default_max_request_bytes
from server.api.protocol import ChatCompletionRequest, ChatCompletionResponse, HealthStatus, ModelCard, ModelList
from server.api.serving import ChatService
from server.engine.types import EngineClient

log = logging.getLogger(__name__)


def get_engine(request: Request) -> EngineClient:
    engine: EngineClient = request.app.state.engine
    return engine


def get_chat(request: Request) -> ChatService:
    chat: ChatService = request.app.state.chat
    return chat


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))],
) -> None:
    api_key: str | None = request.app.state.api_key
    if api_key is None:
        return
    # Bytes, not str: compare_digest refuses non-ASCII strings, and a header may hold any byte.
    sent = credentials.credentials.encode("utf-8", "surrogateescape") if credentials else b""
    if not secrets.compare_digest(sent, api_key.encode()):
        client = request.client.host if request.client else "unknown client"
        log.warning("rejected a request from %s: %s API key", client, "wrong" if credentials else "missing")
        raise APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


@v1.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, chat: Annotated[ChatService, Depends(get_chat)]
) -> Response | ChatCompletionResponse:
    """Non-streaming: a ChatCompletionResponse. With "stream": true: SSE chat.completion.chunk events."""
    return await chat.create(body, request)


@v1.get("/models", response_model=ModelList)
async def list_models(request: Request, engine: Annotated[EngineClient, Depends(get_engine)]) -> ModelList:
    card = ModelCard(id=engine.model_name, created=request.app.state.started, max_model_len=engine.max_model_len)
    return ModelList(data=[card])


health = APIRouter(responses={500: ERROR_RESPONSES[500]})


@health.get("/health", response_model=HealthStatus)
async def get_health(engine: Annotated[EngineClient, Depends(get_engine)]) -> HealthStatus:
    return HealthStatus(model=engine.model_name, engine=engine.stats())


def create_app(
    engine: EngineClient,
    *,
    api_key: str | None = None,
    max_request_bytes: int | None = None,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """An app serving `engine` under its `model_name`.

    With `api_key`, every /v1 route requires `Authorization: Bearer <api_key>`; /health never does.
    Bodies over `max_request_bytes` (default: sized from the context) get 413; with
    `allowed_hosts`, other Host headers get 400. Leaving the lifespan calls `engine.shutdown()`.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    app = FastAPI(
        title="mla-server",
        summary="OpenAI-compatible chat completions for MLA models",
        lifespan=lifespan,
        # A body must say it is JSON: a web page may POST text/plain across origins without a
        # CORS preflight, and that must not start a generation (errors.py words the refusal).
        strict_content_type=True,
    )
    app.state.engine = engine
    app.state.api_key = api_key
    app.state.started = int(time.time())
    app.state.chat = ChatService(engine)
    install_error_handlers(app)
    limit = max_request_bytes or default_max_request_bytes(engine.max_model_len)
    app.add_middleware(BodySizeLimit, max_bytes=limit)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.include_router(v1)
    app.include_router(health)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, less the 422 it declares for every body: validation errors are 400s."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema
