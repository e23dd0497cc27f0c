"""The FastAPI application: routes, auth, and the engine's lifetime.

`create_app(engine)` is all a launcher needs; the engine is reached through dependencies so that
tests can hand in any EngineClient (tests/fake_engine.py).
"""

from __future__ import annotations

import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.api.errors import APIError, install_error_handlers
from server.api.protocol import ChatCompletionRequest, ChatCompletionResponse, HealthStatus, ModelCard, ModelList
from server.api.serving import ChatService
from server.engine.types import EngineClient


@dataclass(frozen=True)
class Settings:
    model_name: str
    api_key: str | None
    started: int


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


def get_chat(request: Request) -> ChatService:
    return request.app.state.chat


def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))],
) -> None:
    if settings.api_key is None:
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials, settings.api_key):
        raise APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@v1.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, chat: Annotated[ChatService, Depends(get_chat)]
) -> Response | ChatCompletionResponse:
    """Non-streaming: a ChatCompletionResponse. With "stream": true: SSE chat.completion.chunk events."""
    return await chat.create(body, request)


@v1.get("/models", response_model=ModelList)
async def list_models(
    settings: Annotated[Settings, Depends(get_settings)], engine: Annotated[EngineClient, Depends(get_engine)]
) -> ModelList:
    card = ModelCard(id=settings.model_name, created=settings.started, max_model_len=engine.max_model_len)
    return ModelList(data=[card])


health = APIRouter()


@health.get("/health", response_model=HealthStatus)
async def get_health(
    settings: Annotated[Settings, Depends(get_settings)], engine: Annotated[EngineClient, Depends(get_engine)]
) -> HealthStatus:
    return HealthStatus(model=settings.model_name, engine=engine.stats())


def create_app(
    engine: EngineClient, *, api_key: str | None = None, served_model_name: str | None = None
) -> FastAPI:
    """An app serving `engine` as `served_model_name` (default: engine.model_name).

    With `api_key`, every /v1 route requires `Authorization: Bearer <api_key>`; /health never does.
    Leaving the lifespan calls `engine.shutdown()`.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    app = FastAPI(
        title="mla-server",
        summary="OpenAI-compatible chat completions for MLA models",
        lifespan=lifespan,
        strict_content_type=False,  # `curl -d '{...}'` without a Content-Type header still works
    )
    model_name = served_model_name or engine.model_name
    app.state.settings = Settings(model_name=model_name, api_key=api_key, started=int(time.time()))
    app.state.engine = engine
    app.state.chat = ChatService(engine, model_name)
    install_error_handlers(app)
    app.include_router(v1)
    app.include_router(health)
    return app
