"""Chat completions: a validated request becomes one engine generation, its deltas a response.

The engine iterator is always closed when the client goes away (that is how the engine learns
to cancel), and the first delta is awaited before any response starts, so that a refusal
(prompt too long, engine busy) is still a plain JSON error rather than a broken stream.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from functools import partial
from typing import Any

import anyio
from fastapi import Request, Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from server.api.disconnect import ClientDisconnected, until_disconnected
from server.api.errors import APIError, to_api_error
from server.api.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    PromptTokensDetails,
    TokenLogprobOut,
    TopLogprob,
    Usage,
)
from server.engine.types import EngineClient, EngineError, StreamDelta, TokenLogprob

logger = logging.getLogger(__name__)

# How long a stream may take to end on its own after the server starts exiting, before
# sse-starlette cuts it off; well under uvicorn's default graceful-shutdown wait.
SHUTDOWN_GRACE_S = 5.0


class ChatService:
    """Serves /v1/chat/completions for one engine under one model name."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self.model_name = engine.model_name

    async def create(self, req: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
        if req.model != self.model_name:
            raise APIError(
                404,
                f"The model '{req.model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )
        prompt_ids = await self.engine.encode_chat(engine_messages(req))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        deltas = self.engine.generate(request_id, prompt_ids, req.to_sampling_params())
        try:
            first = await until_disconnected(request, _next(deltas))
        except ClientDisconnected:
            await deltas.aclose()
            return Response(status_code=499)
        except EngineError:
            await deltas.aclose()
            raise
        if req.stream:
            return self._stream(req, request_id, first, deltas)
        try:
            return await until_disconnected(request, self._complete(req, request_id, first, deltas))
        except ClientDisconnected:
            return Response(status_code=499)

    async def _complete(
        self, req: ChatCompletionRequest, request_id: str, first: StreamDelta, deltas: AsyncGenerator[StreamDelta, None]
    ) -> ChatCompletionResponse:
        text: list[str] = []
        logprobs: list[TokenLogprob] = []
        last = first
        async with aclosing(deltas):
            while True:
                text.append(last.text)
                logprobs.extend(last.logprobs or [])
                if last.finish_reason:
                    break
                last = await _next(deltas)
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=[
                Choice(
                    message=AssistantMessage(content="".join(text)),
                    finish_reason=last.finish_reason,
                    logprobs=choice_logprobs(logprobs) if req.logprobs else None,
                )
            ],
            usage=usage(last),
        )

    def _stream(
        self, req: ChatCompletionRequest, request_id: str, first: StreamDelta, deltas: AsyncGenerator[StreamDelta, None]
    ) -> EventSourceResponse:
        exiting = anyio.Event()
        return EventSourceResponse(
            self._events(req, request_id, first, deltas),
            sep="\n",
            # sse-starlette sets `exiting` when uvicorn starts to exit, however it was started;
            # the engine then ends every stream (with an error event and [DONE]).
            shutdown_event=exiting,
            shutdown_grace_period=SHUTDOWN_GRACE_S,
            data_sender_callable=partial(self._shutdown_engine_when, exiting),
            # A client gone before the first event leaves _events unstarted; close the engine
            # generator anyway (a no-op when _events already did).
            background=BackgroundTask(_aclose, deltas),
        )

    async def _shutdown_engine_when(self, exiting: anyio.Event) -> None:
        await exiting.wait()
        self.engine.shutdown()

    async def _events(
        self, req: ChatCompletionRequest, request_id: str, first: StreamDelta, deltas: AsyncGenerator[StreamDelta, None]
    ) -> AsyncIterator[str]:
        """SSE data: a role chunk, content chunks, a finish chunk, [usage chunk], [DONE].

        An engine failure mid-stream replaces the rest with one error event before [DONE].
        """
        chunk = partial(ChatCompletionChunk, id=request_id, created=int(time.time()), model=self.model_name)
        async with aclosing(deltas):
            try:
                yield chunk(choices=[ChunkChoice(delta=ChunkDelta(role="assistant", content=""))]).model_dump_json()
                delta = first
                while True:
                    if delta.text or delta.logprobs:
                        logprobs = choice_logprobs(delta.logprobs) if delta.logprobs else None
                        yield chunk(
                            choices=[ChunkChoice(delta=ChunkDelta(content=delta.text), logprobs=logprobs)]
                        ).model_dump_json()
                    if delta.finish_reason:
                        break
                    delta = await _next(deltas)
                yield chunk(
                    choices=[ChunkChoice(delta=ChunkDelta(), finish_reason=delta.finish_reason)]
                ).model_dump_json()
                if req.include_usage():
                    yield chunk(choices=[], usage=usage(delta)).model_dump_json()
            except Exception as exc:
                if not isinstance(exc, EngineError):
                    logger.exception("stream %s failed", request_id)
                yield json.dumps(to_api_error(exc).body())
            yield "[DONE]"


def engine_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Chat-template input: plain-string content; "developer" is OpenAI's newer name for system."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]


def usage(last: StreamDelta) -> Usage:
    return Usage(
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        total_tokens=last.prompt_tokens + last.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=last.cached_tokens),
    )


def choice_logprobs(logprobs: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in lp.top],
            )
            for lp in logprobs
        ]
    )


async def _aclose(iterator: AsyncGenerator[Any, None]) -> None:
    # A coroutine function, so that Starlette awaits it rather than calling it in a thread.
    await iterator.aclose()


async def _next(deltas: AsyncGenerator[StreamDelta, None]) -> StreamDelta:
    """The next delta. A generator that ends without a finish_reason was ended by the engine."""
    try:
        return await anext(deltas)
    except StopAsyncIteration:
        raise EngineError("the engine ended the request before it finished") from None
