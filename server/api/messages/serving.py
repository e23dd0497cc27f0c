"""/v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the one engine path
(the chat template, `Generation`), the reply as a message or as Anthropic's named SSE events.

A reply's content is blocks: its text as a text block, each tool call as a tool_use block. The
stream opens a block when its kind changes, so it gives the blocks in the order the model produced
them; the whole message gives its text block first, then its calls (chat completions' order too).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

from fastapi import Request, Response
from sse_starlette import ServerSentEvent

from server.api.errors import APIError
from server.api.generation import ChoiceState, Generation, Service, run
from server.api.messages.protocol import (
    CountTokensResponse,
    MessageResponse,
    MessagesRequest,
    MessagesUsage,
    PromptRequest,
    StopReason,
    TextOut,
    ToolUseOut,
)
from server.api.sse import Framing
from server.engine.types import StreamDelta

logger = logging.getLogger(__name__)

# The engine's finish reasons as Anthropic's stop reasons ("stop" is end_turn or stop_sequence).
_STOP_REASONS: dict[str, StopReason] = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _error_event(error: APIError) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(error.anthropic_body()), event="error")


FRAMING = Framing(error=_error_event, done=None, ping=lambda: _event("ping"))


class MessagesService(Service):
    """Serves /v1/messages for one engine under its model name."""

    async def create(self, req: MessagesRequest, request: Request) -> Response | MessageResponse:
        timer = self.admit(req.model, 1)
        prompt_ids = await self.engine.encode_chat(req.template_messages(), req.tool_specs or None)
        params = req.to_sampling_params(room=self.engine.max_model_len - len(prompt_ids))
        message_id = f"msg_{uuid.uuid4().hex}"
        start = Generation.start(self.engine, message_id, [prompt_ids], params, 1, timer, bool(req.stream))
        events = partial(self._events, message_id) if req.stream else None
        return await run(request, start, partial(self._message, message_id), events, FRAMING)

    async def count_tokens(self, req: PromptRequest) -> CountTokensResponse:
        """The prompt's tokens, as /v1/messages would count them (cached or not)."""
        self.check_model(req.model)
        return CountTokensResponse(
            input_tokens=len(await self.engine.encode_chat(req.template_messages(), req.tool_specs or None))
        )

    def _message(self, message_id: str, gen: Generation) -> MessageResponse:
        (c,) = gen.choices
        text = "".join(c.text)
        content: list[TextOut | ToolUseOut] = [TextOut(text=text)] if text else []
        content += [
            ToolUseOut(id=t.id or "", name=t.name or "", input=ToolUseOut.parse_input(t.arguments))
            for _, t in sorted(c.tool_calls.items())
        ]
        stop_reason, stop_sequence = _stop(c)
        return MessageResponse(
            id=message_id,
            model=self.engine.model_name,
            content=content,
            stop_reason=stop_reason,
            stop_sequence=stop_sequence,
            usage=_finished(c),
        )

    async def _events(self, message_id: str, gen: Generation) -> AsyncIterator[ServerSentEvent]:
        """message_start (once the first delta tells the cache hit), ping, the content blocks'
        events, message_delta (stop reason, usage), message_stop; sse.py sends the error event
        if the engine fails."""
        blocks = _BlockStream()
        started = False
        async for c, delta in gen.deltas():
            if not started:
                started = True
                message = MessageResponse(
                    id=message_id,
                    model=self.engine.model_name,
                    content=[],
                    stop_reason=None,
                    stop_sequence=None,
                    usage=_usage(c),
                )
                yield _event("message_start", message=message.model_dump())
                yield _event("ping")
            for name, fields in blocks.feed(delta):
                yield _event(name, **fields)
            if delta.finish_reason:
                for name, fields in blocks.close():
                    yield _event(name, **fields)
                stop_reason, stop_sequence = _stop(c)
                yield _event(
                    "message_delta",
                    delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    usage=_finished(c).model_dump(),
                )
        yield _event("message_stop")


def _event(name: str, **fields: Any) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps({"type": name, **fields}), event=name)


def _stop(c: ChoiceState) -> tuple[StopReason | None, str | None]:
    if c.finish_reason is None:
        return None, None
    if c.stop_sequence is not None:
        return "stop_sequence", c.stop_sequence
    return _STOP_REASONS[c.finish_reason], None


def _finished(c: ChoiceState) -> MessagesUsage:
    """The final usage, logged: the prefix-cache hit is what an operator checks when an agent's
    long prompts are slow."""
    logger.debug(
        "message: %d prompt tokens (%d from the cache), %d output tokens, finish %s",
        c.prompt_tokens,
        c.cached_tokens,
        c.completion_tokens,
        c.finish_reason,
    )
    return _usage(c)


def _usage(c: ChoiceState) -> MessagesUsage:
    return MessagesUsage(
        input_tokens=c.prompt_tokens - c.cached_tokens,
        output_tokens=c.completion_tokens,
        cache_read_input_tokens=c.cached_tokens,
    )


class _BlockStream:
    """One reply's deltas as content-block events: text in a text block, each tool call in a
    tool_use block whose input streams as input_json_delta fragments."""

    def __init__(self) -> None:
        self._index = -1
        self._open: int | str | None = None  # "text", a tool call's index, or no open block

    def feed(self, delta: StreamDelta) -> Iterator[tuple[str, dict[str, Any]]]:
        if delta.text:
            if self._open != "text":
                yield from self._start("text", TextOut(text=""))
            yield "content_block_delta", {"index": self._index, "delta": {"type": "text_delta", "text": delta.text}}
        for piece in delta.tool_calls or []:
            if self._open != piece.index:
                yield from self._start(piece.index, ToolUseOut(id=piece.id or "", name=piece.name or "", input={}))
            if piece.arguments:
                fragment = {"type": "input_json_delta", "partial_json": piece.arguments}
                yield "content_block_delta", {"index": self._index, "delta": fragment}

    def close(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self._open is not None:
            yield "content_block_stop", {"index": self._index}
        self._open = None

    def _start(self, kind: int | str, block: TextOut | ToolUseOut) -> Iterator[tuple[str, dict[str, Any]]]:
        yield from self.close()
        self._index += 1
        self._open = kind
        yield "content_block_start", {"index": self._index, "content_block": block.model_dump()}
