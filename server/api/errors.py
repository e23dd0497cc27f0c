"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and their handlers.

Every failure a client can cause maps to a 4xx here; anything else is a 500 in the same shape
so that SDKs always find an error object to raise.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.types import EngineError, InvalidRequest, PromptTooLong

class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def engine_api_error(exc: EngineError) -> APIError:
    """A prompt the model can't hold is the client's fault; other engine refusals are ours."""
    if isinstance(exc, PromptTooLong):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc))
    return APIError(503, str(exc) or "the engine could not serve this request", type="server_error")


def _param_name(loc: tuple) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"."""
    name = ""
    for part in loc[1:]:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or None


def validation_api_error(exc: RequestValidationError) -> APIError:
    """Names the first offending field."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"invalid JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
    param = _param_name(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "field required"
    if param is None:
        message = f"the request body must be a JSON object (Content-Type: application/json): {message}"
    else:
        message = f"{param}: {message}"
    return APIError(400, message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_api_error(exc).response()

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return engine_api_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return APIError(exc.status_code, message, type=error_type).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this response, so the server logs the traceback.
        return APIError(500, "internal server error", type="server_error").response()
