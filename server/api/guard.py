"""What the server refuses before a request reaches a route: bodies over the size limit
(`BodySizeLimit`), and hosts that are not this server's (Starlette's TrustedHostMiddleware,
against DNS rebinding).

Both run as ASGI middleware, so an oversized body is refused from its Content-Length, or as soon
as the bytes streamed in pass the limit, without being parsed or buffered whole.
"""

from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError

# Names a browser on this machine uses for a server bound to loopback.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def default_max_request_bytes(max_model_len: int) -> int:
    """A body large enough for any prompt the context can hold: 1 MiB of envelope plus 64 bytes a
    token (a long token's characters, UTF-8 and JSON escaping included)."""
    return (1 << 20) + 64 * max_model_len


def default_allowed_hosts(bind_host: str) -> list[str] | None:
    """Loopback names for a server bound to loopback; None (any host) otherwise."""
    try:
        loopback = bind_host == "localhost" or ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        loopback = False
    return list(LOOPBACK_HOSTS) if loopback else None


class BodySizeLimit:
    """Answers 413 in OpenAI's error shape for a request body over `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        # Without a trustworthy length, read the body here (at most max_bytes of it) and hand
        # the app the same messages.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(
            413,
            f"the request body is larger than this server's limit of {self.max_bytes} bytes (--max-request-bytes)",
            code="request_too_large",
        )
        await error.response(scope["path"])(scope, receive, send)
