"""Server-sent events, one framing for every API: each names its events and how a stream ends.

OpenAI's chat and text completions send data-only events and end with `data: [DONE]`; the
Anthropic Messages and OpenAI Responses streams send named events (`event: message_start`) and
no terminator. An API hands `event_stream` its events as sse-starlette's `ServerSentEvent`s and a
`Framing`; what happens when the engine fails mid-stream, when the client leaves and when the
server starts to exit is the same for all of them and lives here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from server.api.errors import APIError, to_api_error
from server.engine.types import EngineError

logger = logging.getLogger(__name__)

# How long a stream may take to end on its own after the server starts exiting, before
# sse-starlette cuts it off; well under uvicorn's default graceful-shutdown wait.
SHUTDOWN_GRACE_S = 5.0
# Seconds between keep-alive pings on a quiet stream (sse-starlette's default).
PING_S = 15.0


def openai_error_event(error: APIError) -> ServerSentEvent:
    return ServerSentEvent(data=error.body_json())


@dataclass(frozen=True)
class Framing:
    """How an API's stream ends. `error` is the event that replaces the rest of a stream when the
    engine fails mid-way; `done` is sent after the last event, however the stream ended."""

    error: Callable[[APIError], ServerSentEvent] = openai_error_event
    done: ServerSentEvent | None = ServerSentEvent(data="[DONE]")
    # The keep-alive sent every `PING_S` while nothing else is (a long prefill): an SSE comment,
    # unless the API names its own (Anthropic's `ping` event).
    ping: Callable[[], ServerSentEvent] | None = None


async def _framed(
    events: AsyncIterator[ServerSentEvent], framing: Framing, close: Callable[[], Awaitable[None]]
) -> AsyncIterator[ServerSentEvent]:
    try:
        async for event in events:
            yield event
    except Exception as exc:
        if not isinstance(exc, EngineError):
            logger.exception("a stream failed")
        yield framing.error(to_api_error(exc))
    finally:
        await close()
    if framing.done is not None:
        yield framing.done


def event_stream(
    events: AsyncIterator[ServerSentEvent],
    close: Callable[[], Awaitable[None]],
    shutdown: Callable[[], None],
    framing: Framing,
) -> EventSourceResponse:
    """An SSE response of `events`, framed. `close` (idempotent) ends the request's generations
    however the response ends, also when the client left before the first event (which leaves
    `events` unstarted). When the server starts to exit (sse-starlette notices it however uvicorn
    was started) `shutdown` makes the engine end every stream, so each ends with its error event."""
    exiting = anyio.Event()

    async def watch() -> None:
        await exiting.wait()
        shutdown()

    return EventSourceResponse(
        _framed(events, framing, close),
        sep="\n",
        shutdown_event=exiting,
        shutdown_grace_period=SHUTDOWN_GRACE_S,
        data_sender_callable=watch,
        ping=PING_S,
        ping_message_factory=framing.ping,
        background=BackgroundTask(close),
    )
