"""/v1/chat/completions: messages (and tools) through the chat template, choices back as a
`chat.completion` or as `chat.completion.chunk` events."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial

from fastapi import Request, Response
from sse_starlette import ServerSentEvent

from server.api.chat.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    FunctionCallDelta,
    FunctionCallOut,
    TokenLogprobOut,
    ToolCallChunk,
    ToolCallOut,
    TopLogprob,
)
from server.api.generation import ChoiceState, Generation, Service, run
from server.api.protocol import Usage
from server.engine.types import StreamDelta, TokenLogprob


class ChatService(Service):
    """Serves /v1/chat/completions for one engine under its model name."""

    async def create(self, req: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
        timer = self.admit(req.model, req.n)
        messages = [m.to_template() for m in req.messages]
        prompt_ids = await self.engine.encode_chat(messages, req.tool_specs or None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        start = Generation.start(
            self.engine, request_id, [prompt_ids], req.to_sampling_params(), req.n, timer, bool(req.stream)
        )

        def respond(gen: Generation) -> ChatCompletionResponse:
            choices = [self._choice(req, c) for c in gen.choices]
            return ChatCompletionResponse(
                id=request_id, model=self.engine.model_name, choices=choices, usage=Usage.of(gen.usage())
            )

        chunk = partial(ChatCompletionChunk, id=request_id, created=int(time.time()), model=self.engine.model_name)
        events = partial(self._events, req, chunk) if req.stream else None
        return await run(request, start, respond, events)

    def _choice(self, req: ChatCompletionRequest, c: ChoiceState) -> Choice:
        text = "".join(c.text)
        calls = [
            ToolCallOut(id=t.id or "", function=FunctionCallOut(name=t.name or "", arguments=t.arguments))
            for _, t in sorted(c.tool_calls.items())
        ] or None
        return Choice(
            index=c.index,
            message=AssistantMessage(content=text if text or not calls else None, tool_calls=calls),
            finish_reason=c.finish_reason or "stop",
            logprobs=choice_logprobs(c.logprobs) if req.logprobs else None,
        )

    async def _events(
        self, req: ChatCompletionRequest, chunk: Callable[..., ChatCompletionChunk], gen: Generation
    ) -> AsyncIterator[ServerSentEvent]:
        """SSE data: per choice a role chunk, content and tool-call chunks, a finish chunk; then
        the usage chunk when asked (sse.py adds an error event if the engine fails, and [DONE])."""

        def event(**fields: object) -> ServerSentEvent:
            return ServerSentEvent(data=chunk(**fields).model_dump_json())

        for c in gen.choices:
            yield event(choices=[ChunkChoice(index=c.index, delta=ChunkDelta(role="assistant", content=""))])
        async for c, delta in gen.deltas():
            if delta.text or delta.logprobs or delta.tool_calls:
                yield event(choices=[_chunk_choice(c.index, delta, bool(req.logprobs))])
            if delta.finish_reason:
                yield event(choices=[ChunkChoice(index=c.index, delta=ChunkDelta(), finish_reason=delta.finish_reason)])
        if req.include_usage():
            yield event(choices=[], usage=Usage.of(gen.usage()))


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
