"""/v1/chat/completions: messages (and tools) through the chat template, choices back as a
`chat.completion` or as `chat.completion.chunk` events."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial

from fastapi import Request, Response

from server.api.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    FunctionCallDelta,
    TokenLogprobOut,
    ToolCallChunk,
    TopLogprob,
)
from server.api.serving import ChoiceState, Generation, Service, run
from server.engine.types import StreamDelta, TokenLogprob

logger = logging.getLogger(__name__)


class ChatService(Service):
    """Serves /v1/chat/completions for one engine under its model name."""

    async def create(self, req: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
        timer = self.admit(req.model, req.n)
        messages = [m.to_template() for m in req.messages]
        prompt_ids = await self.engine.encode_chat(messages, req.tool_specs() or None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        start = Generation.start(self.engine, request_id, [prompt_ids], req.to_sampling_params(), req.n, timer)

        def respond(gen: Generation) -> ChatCompletionResponse:
            choices = [self._choice(req, c) for c in gen.choices]
            return ChatCompletionResponse(
                id=request_id, model=self.engine.model_name, choices=choices, usage=gen.usage()
            )

        chunk = partial(ChatCompletionChunk, id=request_id, created=int(time.time()), model=self.engine.model_name)
        events = partial(self._events, req, chunk) if req.stream else None
        usage = (lambda u: chunk(choices=[], usage=u).model_dump_json()) if req.include_usage() else None
        return await run(request, start, events, respond, usage)

    def _choice(self, req: ChatCompletionRequest, c: ChoiceState) -> Choice:
        text = "".join(c.text)
        calls = [c.tool_calls[i] for i in sorted(c.tool_calls)] or None
        return Choice(
            index=c.index,
            message=AssistantMessage(content=text if text or not calls else None, tool_calls=calls),
            finish_reason=c.finish_reason or "stop",
            logprobs=choice_logprobs(c.logprobs) if req.logprobs else None,
        )

    async def _events(
        self, req: ChatCompletionRequest, chunk: Callable[..., ChatCompletionChunk], gen: Generation
    ) -> AsyncIterator[str]:
        """SSE data: per choice a role chunk, content and tool-call chunks, a finish chunk
        (`serving.run` adds the usage chunk, an error event if the engine fails, and [DONE])."""
        for c in gen.choices:
            role = ChunkChoice(index=c.index, delta=ChunkDelta(role="assistant", content=""))
            yield chunk(choices=[role]).model_dump_json()
        async for c, delta in gen.deltas():
            if delta.text or delta.logprobs or delta.tool_calls:
                yield chunk(choices=[_chunk_choice(c.index, delta, bool(req.logprobs))]).model_dump_json()
            if delta.finish_reason:
                finish = ChunkChoice(index=c.index, delta=ChunkDelta(), finish_reason=delta.finish_reason)
                yield chunk(choices=[finish]).model_dump_json()


def _chunk_choice(index: int, delta: StreamDelta, logprobs: bool) -> ChunkChoice:
    calls = [
        ToolCallChunk(
            index=t.index,
            id=t.id,
            type="function" if t.id else None,
            function=FunctionCallDelta(name=t.name, arguments=t.arguments),
        )
        for t in delta.tool_calls or []
    ] or None
    return ChunkChoice(
        index=index,
        delta=ChunkDelta(content=delta.text if delta.text or not calls else None, tool_calls=calls),
        logprobs=choice_logprobs(delta.logprobs) if logprobs and delta.logprobs else None,
    )


def choice_logprobs(logprobs: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=lp.token,
                logprob=lp.logprob,
                bytes=lp.bytes if lp.bytes is not None else list(lp.token.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in lp.top],
            )
            for lp in logprobs
        ]
    )
