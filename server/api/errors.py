"""The one place where any failure becomes an HTTP status and an error body, in the shape of the
API the request came through: OpenAI's {"error": {"message", "type", "param", "code"}}, or on the
Anthropic Messages routes (/v1/messages...) Anthropic's {"type": "error", "error": {"type",
"message"}}.

`to_api_error` maps every exception a request can meet; the app's exception handlers and the
stream's error event both use it. Every failure a client can cause maps to a 4xx; anything else
is a 500 in the same shape, so that SDKs always find an error object to raise.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server.api.messages.protocol import AnthropicErrorInfo, AnthropicErrorResponse
from server.api.protocol import ErrorInfo, ErrorResponse
from server.engine.types import EngineError, EngineOverloaded, InvalidRequest, PromptTooLong, RequestTimeout

# Seconds an overloaded server asks a client to wait before retrying.
RETRY_AFTER_S = 1

# Routes whose errors take Anthropic's shape.
ANTHROPIC_PREFIX = "/v1/messages"

# Anthropic's error type for each status it documents; any other 5xx is an api_error. 503 is
# what this server sends when the engine cannot serve (or timed out): a transient failure, which
# Anthropic words as overloaded_error.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # A message may echo client input; a lone surrogate in it could not be encoded as UTF-8.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=self.info).model_dump()

    def body_json(self) -> str:
        return ErrorResponse(error=self.info).model_dump_json()

    def anthropic_body(self) -> dict[str, Any]:
        fallback = "invalid_request_error" if self.status < 500 else "api_error"
        info = AnthropicErrorInfo(type=_ANTHROPIC_TYPES.get(self.status, fallback), message=self.info.message)
        return AnthropicErrorResponse(error=info).model_dump()

    def response(self, path: str = "") -> JSONResponse:
        """The error as a response to a request for `path` (its API picks the body's shape)."""
        body = self.anthropic_body() if path.startswith(ANTHROPIC_PREFIX) else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def to_api_error(exc: BaseException) -> APIError:
    """The HTTP status and OpenAI error for any exception met while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLong):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, EngineOverloaded):
        return APIError(
            429, str(exc), type="requests", code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    if isinstance(exc, RequestTimeout):
        # OpenAI's SDKs retry a 503 twice, which would run the same long request three times.
        return APIError(503, str(exc), type="server_error", code="timeout", headers={"x-should-retry": "false"})
    if isinstance(exc, EngineError):  # the engine could not serve a valid request: ours
        return APIError(503, str(exc) or "the engine could not serve this request", type="server_error")
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, StarletteHTTPException):
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return APIError(exc.status_code, message, type=error_type, headers=dict(exc.headers or {}))
    return APIError(500, "internal server error", type="server_error")


def _param_name(loc: tuple[int | str, ...]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"."""
    name = ""
    for part in loc[1:]:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or None


def _validation_error(exc: RequestValidationError) -> APIError:
    """Names the first offending field."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"invalid JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
    param = _param_name(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "field required"
    if param is None and isinstance(first.get("input"), bytes | str):
        # FastAPI leaves a body not declared as JSON unparsed.
        message = "the request body must be JSON, sent with 'Content-Type: application/json'"
    elif param is None:
        message = f"the request body must be a JSON object: {message}"
    else:
        message = f"{param}: {message}"
    return APIError(400, message, param=param)


# The error responses every route may send, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": HTTPStatus(status).phrase}
    for status in (400, 401, 404, 413, 429, 500, 503)
}

# The same, in Anthropic's shape, for the /v1/messages routes.
ANTHROPIC_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {**response, "model": AnthropicErrorResponse} for status, response in ERROR_RESPONSES.items()
}


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        # For a 500, Starlette re-raises after this response, so the server logs the traceback.
        error = to_api_error(exc)
        if error.status == 405:
            error.headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return error.response(request.url.path)

    for kind in (APIError, RequestValidationError, EngineError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at the request's path. Starlette's 405 names only the first
    route that matched the path, and a path may have several (GET and DELETE /v1/responses/{id})."""
    return [
        method
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE")
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in app.router.routes)
    ]
