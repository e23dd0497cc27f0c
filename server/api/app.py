"""The FastAPI application: routes, auth, and the engine's lifetime.

`create_app(engine)` is all a launcher needs; the engine is reached through dependencies so that
tests can hand in any EngineClient (tests/support/fake_engine.py).
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
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from server.api.chat.protocol import ChatCompletionRequest, ChatCompletionResponse
from server.api.chat.serving import ChatService
from server.api.completions.protocol import CompletionRequest, CompletionResponse
from server.api.completions.serving import CompletionService
from server.api.errors import ANTHROPIC_ERROR_RESPONSES, ERROR_RESPONSES, APIError, install_error_handlers
from server.api.guard import BodySizeLimit, default_max_request_bytes
from server.api.messages.protocol import CountTokensResponse, MessageResponse, MessagesRequest, PromptRequest
from server.api.messages.serving import MessagesService
from server.api.metrics import CONTENT_TYPE, Metrics
from server.api.protocol import HealthStatus, ModelCard, ModelList
from server.api.responses.protocol import DeletedResponse, ResponseObject, ResponseRequest
from server.api.responses.serving import ResponsesService
from server.api.responses.store import DEFAULT_STORED_RESPONSES, ResponseStore
from server.engine.types import EngineClient

# Choices a request may ask for (`n`, times the prompts of a completion) unless --max-n says otherwise.
DEFAULT_MAX_N = 16

log = logging.getLogger(__name__)


def get_engine(request: Request) -> EngineClient:
    engine: EngineClient = request.app.state.engine
    return engine


def get_chat(request: Request) -> ChatService:
    chat: ChatService = request.app.state.chat
    return chat


def get_completions(request: Request) -> CompletionService:
    completions: CompletionService = request.app.state.completions
    return completions


def get_responses(request: Request) -> ResponsesService:
    responses: ResponsesService = request.app.state.responses
    return responses


def get_messages(request: Request) -> MessagesService:
    messages: MessagesService = request.app.state.messages
    return messages


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))],
    x_api_key: Annotated[str | None, Depends(APIKeyHeader(name="x-api-key", auto_error=False))],
) -> None:
    """The key as OpenAI's clients send it (bearer) or as Anthropic's do (x-api-key)."""
    api_key: str | None = request.app.state.api_key
    if api_key is None:
        return
    given = credentials.credentials if credentials else x_api_key
    # Bytes, not str: compare_digest refuses non-ASCII strings, and a header may hold any byte.
    sent = given.encode("utf-8", "surrogateescape") if given is not None else b""
    if not secrets.compare_digest(sent, api_key.encode()):
        client = request.client.host if request.client else "unknown client"
        log.warning("rejected a request from %s: %s API key", client, "wrong" if given is not None else "missing")
        raise APIError(
            401,
            "Incorrect or missing API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')",
            code="invalid_api_key",
        )


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


@v1.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, chat: Annotated[ChatService, Depends(get_chat)]
) -> Response | ChatCompletionResponse:
    """Non-streaming: a ChatCompletionResponse. With "stream": true: SSE chat.completion.chunk events."""
    return await chat.create(body, request)


@v1.post("/completions", response_model=CompletionResponse)
async def completions(
    body: CompletionRequest, request: Request, service: Annotated[CompletionService, Depends(get_completions)]
) -> Response | CompletionResponse:
    """Non-streaming: a CompletionResponse. With "stream": true: SSE text_completion events."""
    return await service.create(body, request)


@v1.post("/responses", response_model=ResponseObject)
async def create_response(
    body: ResponseRequest, request: Request, service: Annotated[ResponsesService, Depends(get_responses)]
) -> Response | ResponseObject:
    """Non-streaming: a response object. With "stream": true: SSE response.* events."""
    return await service.create(body, request)


@v1.get("/responses/{response_id}", response_model=ResponseObject)
async def get_response(
    response_id: str, service: Annotated[ResponsesService, Depends(get_responses)]
) -> ResponseObject:
    """A stored response (one created with "store": true, not yet evicted or deleted)."""
    return service.stored(response_id).response


@v1.delete("/responses/{response_id}", response_model=DeletedResponse)
async def delete_response(
    response_id: str, service: Annotated[ResponsesService, Depends(get_responses)]
) -> DeletedResponse:
    return service.delete(response_id)


@v1.post("/messages", response_model=MessageResponse, responses=ANTHROPIC_ERROR_RESPONSES)
async def messages(
    body: MessagesRequest, request: Request, service: Annotated[MessagesService, Depends(get_messages)]
) -> Response | MessageResponse:
    """Anthropic's Messages API. Non-streaming: a message. With "stream": true: its named SSE events."""
    return await service.create(body, request)


@v1.post("/messages/count_tokens", response_model=CountTokensResponse, responses=ANTHROPIC_ERROR_RESPONSES)
async def count_message_tokens(
    body: PromptRequest, service: Annotated[MessagesService, Depends(get_messages)]
) -> CountTokensResponse:
    """The prompt tokens /v1/messages would count for the same messages, system and tools."""
    return await service.count_tokens(body)


def _card(request: Request, engine: EngineClient) -> ModelCard:
    return ModelCard(id=engine.model_name, created=request.app.state.started, max_model_len=engine.max_model_len)


@v1.get("/models", response_model=ModelList)
async def list_models(request: Request, engine: Annotated[EngineClient, Depends(get_engine)]) -> ModelList:
    return ModelList(data=[_card(request, engine)])


@v1.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request, engine: Annotated[EngineClient, Depends(get_engine)]) -> ModelCard:
    if model_id != engine.model_name:
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return _card(request, engine)


health = APIRouter(responses={500: ERROR_RESPONSES[500]})


@health.get("/health", response_model=HealthStatus)
async def get_health(engine: Annotated[EngineClient, Depends(get_engine)]) -> HealthStatus:
    return HealthStatus(model=engine.model_name, engine=engine.stats())


# Prometheus scrapes /metrics; behind the API key when one is set (it tells load and model name).
@health.get(
    "/metrics",
    dependencies=[Depends(require_api_key)],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, 401: ERROR_RESPONSES[401]},
)
async def metrics(request: Request) -> Response:
    """Prometheus text format: request counts, cache usage, token counters, latency histograms."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)


def create_app(
    engine: EngineClient,
    *,
    api_key: str | None = None,
    max_request_bytes: int | None = None,
    allowed_hosts: list[str] | None = None,
    cors_origins: list[str] | None = None,
    max_n: int = DEFAULT_MAX_N,
    stored_responses: int = DEFAULT_STORED_RESPONSES,
) -> FastAPI:
    """An app serving `engine` under its `model_name`.

    With `api_key`, every /v1 route requires `Authorization: Bearer <api_key>` (or Anthropic's
    `x-api-key: <api_key>`); /health never does.
    Bodies over `max_request_bytes` (default: sized from the context) get 413; with
    `allowed_hosts`, other Host headers get 400. CORS is off unless `cors_origins` names origins
    ("*" for any). /v1/responses keeps the last `stored_responses` stored responses. Leaving the
    lifespan calls `engine.shutdown()`.
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
    app.state.metrics = Metrics(engine)
    app.state.chat = ChatService(engine, app.state.metrics, max_n)
    app.state.completions = CompletionService(engine, app.state.metrics, max_n)
    app.state.responses = ResponsesService(engine, app.state.metrics, ResponseStore(stored_responses))

    app.state.messages = MessagesService(engine, app.state.metrics, max_n)
    install_error_handlers(app)
    limit = max_request_bytes or default_max_request_bytes(engine.max_model_len)
    app.add_middleware(BodySizeLimit, max_bytes=limit)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"]
        )
    if allowed_hosts is not None:  # added last, so it runs first
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.include_router(v1)
    app.include_router(health)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, less the 422 it declares for every body (validation errors are 400s),
    and without the bearer requirement when the server has no API key (nothing is required then:
    a client or checker reading the document would otherwise expect a 401 without the header)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        keyless = app.state.api_key is None
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
                if keyless:
                    operation.pop("security", None)
        if keyless:
            schema.get("components", {}).pop("securitySchemes", None)
        app.openapi_schema = schema
    return app.openapi_schema
