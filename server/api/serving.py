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
from contextlib import aclosing
from functools import partial
from typing import AsyncIterator

import anyio
from fastapi import Request, Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from server.api.disconnect import ClientDisconnected, until_disconnected
from server.api.errors import APIError, engine_api_error
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
from server.engine.types import EngineClient, EngineError, SamplingParams, StreamDelta, TokenLogprob

logger = logging.getLogger(__name__)

# How long a stream may take to end on its own after the server starts exiting, before
# sse-starlette cuts it off; well under uvicorn's default graceful-shutdown wait.
SHUTDOWN_GRACE_S = 5.0


class ChatService:
    """Serves /v1/chat/completions for one engine under one model name."""

    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    async def create(self, req: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
        if req.model != self.model_name:
            raise APIError(
                404, f"The model '{req.model}' does not exist; this server serves '{self.model_name}'",
                param="model", code="model_not_found",
            )
        try:
            prompt_ids = self.engine.encode_chat(engine_messages(req))
        except EngineError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        params = sampling_params(req, len(prompt_ids), self.engine.max_model_len)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        deltas = self.engine.generate(request_id, prompt_ids, params)
        try:
            first = await until_disconnected(request, anext(deltas, None))
            if first is None:
                raise _ended_early()
        except ClientDisconnected:
            await deltas.aclose()
            return Response(status_code=499)
        except EngineError as exc:
            await deltas.aclose()
            raise engine_api_error(exc) from exc
        if req.stream:
            return self._stream(req, request_id, first, deltas)
        try:
            return await until_disconnected(request, self._complete(req, request_id, first, deltas))
        except ClientDisconnected:
            return Response(status_code=499)

    async def _complete(
        self, req: ChatCompletionRequest, request_id: str, first: StreamDelta, deltas: AsyncIterator[StreamDelta]
    ) -> ChatCompletionResponse:
        text, logprobs, last = [], [], first
        try:
            async with aclosing(deltas):
                while True:
                    text.append(last.text)
                    logprobs.extend(last.logprobs or [])
                    if last.finish_reason:
                        break
                    last = await anext(deltas, None)
                    if last is None:
                        raise _ended_early()
        except EngineError as exc:
            raise engine_api_error(exc) from exc
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
        self, req: ChatCompletionRequest, request_id: str, first: StreamDelta, deltas: AsyncIterator[StreamDelta]
    ) -> EventSourceResponse:
        exiting = anyio.Event()
        return EventSourceResponse(
            self._events(req, request_id, first, deltas),
            sep="\n",
            shutdown_event=exiting,
            shutdown_grace_period=SHUTDOWN_GRACE_S,
            data_sender_callable=partial(self._shutdown_engine_when, exiting),
            # A client gone before the first event leaves _events unstarted; close the engine
            # iterator anyway (a no-op when _events already did).
            background=BackgroundTask(_aclose, deltas),
        )

    async def _shutdown_engine_when(self, exiting: anyio.Event) -> None:
        """The server is exiting: have the engine end every stream, so each ends with [DONE]."""
        await exiting.wait()
        self.engine.shutdown()

    async def _events(
        self, req: ChatCompletionRequest, request_id: str, first: StreamDelta, deltas: AsyncIterator[StreamDelta]
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
                    delta = await anext(deltas, None)
                    if delta is None:
                        raise _ended_early()
                yield chunk(
                    choices=[ChunkChoice(delta=ChunkDelta(), finish_reason=delta.finish_reason)]
                ).model_dump_json()
                if req.include_usage():
                    yield chunk(choices=[], usage=usage(delta)).model_dump_json()
            except EngineError as exc:
                yield json.dumps(engine_api_error(exc).body())
            except Exception:
                logger.exception("stream %s failed", request_id)
                yield json.dumps(APIError(500, "internal server error", type="server_error").body())
            yield "[DONE]"


def engine_messages(req: ChatCompletionRequest) -> list[dict]:
    """Chat-template input: plain-string content; "developer" is OpenAI's newer name for system."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
    ]


def sampling_params(req: ChatCompletionRequest, prompt_len: int, max_model_len: int) -> SamplingParams:
    """Raises APIError(400) when the prompt, or prompt plus the requested tokens, can't fit."""
    if prompt_len >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens, but the messages "
            f"resulted in {prompt_len} tokens. Please shorten the messages.",
            param="messages", code="context_length_exceeded",
        )
    requested = req.max_completion_tokens or req.max_tokens
    if requested is not None and prompt_len + requested > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens; the messages use "
            f"{prompt_len} and {requested} more were requested. Lower max_tokens to at most "
            f"{max_model_len - prompt_len}.",
            param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
            code="context_length_exceeded",
        )
    optional = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": max(req.top_k, 0) if req.top_k is not None else None,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "seed": req.seed,
        "top_logprobs": req.top_logprobs,
    }
    return SamplingParams(
        max_tokens=requested or max_model_len - prompt_len,
        stop=req.stop_list(),
        logprobs=bool(req.logprobs),
        logit_bias={int(token): bias for token, bias in (req.logit_bias or {}).items()},
        **{name: value for name, value in optional.items() if value is not None},
    )


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


async def _aclose(iterator: AsyncIterator) -> None:
    # A coroutine function, so that Starlette awaits it rather than calling it in a thread.
    await iterator.aclose()


def _ended_early() -> EngineError:
    """An iterator that ends without a finish_reason was ended by the engine (e.g. shutdown)."""
    return EngineError("the engine ended the request before it finished")
