"""/v1/completions: plain prompts (text or token ids, one or several), `text_completion` back."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial

from fastapi import Request, Response
from sse_starlette import ServerSentEvent

from server.api.completions.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from server.api.errors import APIError
from server.api.generation import Generation, Service, run
from server.api.protocol import Usage
from server.engine.types import TokenLogprob


class CompletionService(Service):
    """Serves /v1/completions for one engine under its model name."""

    async def create(self, req: CompletionRequest, request: Request) -> Response | CompletionResponse:
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (prompt logprobs are not computed)", param="echo")
        timer = self.admit(req.model, req.n * len(req.prompts()))
        prompts = [p if isinstance(p, list) else await self.engine.encode_text(p) for p in req.prompts()]
        echoes = [self.engine.decode(ids) if req.echo else "" for ids in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        start = Generation.start(
            self.engine, request_id, prompts, req.to_sampling_params(), req.n, timer, bool(req.stream)
        )

        def respond(gen: Generation) -> CompletionResponse:
            choices = [
                CompletionChoice(
                    index=c.index,
                    text=echoes[c.index // req.n] + "".join(c.text),
                    finish_reason=c.finish_reason,
                    logprobs=completion_logprobs(c.logprobs, 0) if req.logprobs is not None else None,
                )
                for c in gen.choices
            ]
            return CompletionResponse(
                id=request_id, model=self.engine.model_name, choices=choices, usage=Usage.of(gen.usage())
            )

        chunk = partial(CompletionResponse, id=request_id, created=int(time.time()), model=self.engine.model_name)
        events = partial(self._events, req, chunk, echoes) if req.stream else None
        return await run(request, start, respond, events)

    async def _events(
        self, req: CompletionRequest, chunk: Callable[..., CompletionResponse], echoes: list[str], gen: Generation
    ) -> AsyncIterator[ServerSentEvent]:
        """SSE data: text chunks per choice (the echoed prompt first), the finish on each choice's
        last chunk, then the usage chunk when asked (sse.py adds an error event if the engine
        fails, and [DONE])."""

        def event(**fields: object) -> ServerSentEvent:
            return ServerSentEvent(data=chunk(**fields).model_dump_json())

        offsets = {c.index: len(echoes[c.index // req.n]) for c in gen.choices}
        for c in gen.choices:
            if echoes[c.index // req.n]:
                yield event(choices=[CompletionChoice(index=c.index, text=echoes[c.index // req.n])])
        async for c, delta in gen.deltas():
            logprobs = None
            if req.logprobs is not None and delta.logprobs:
                logprobs = completion_logprobs(delta.logprobs, offsets[c.index])
            offsets[c.index] += len(delta.text)
            if delta.text or logprobs or delta.finish_reason:
                choice = CompletionChoice(
                    index=c.index, text=delta.text, finish_reason=delta.finish_reason, logprobs=logprobs
                )
                yield event(choices=[choice])
        if req.include_usage():
            yield event(choices=[], usage=Usage.of(gen.usage()))


def completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """The legacy parallel lists; `text_offset` counts characters from `offset`."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(
        tokens=[lp.token for lp in logprobs],
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[dict(lp.top) if lp.top else None for lp in logprobs],
        text_offset=offsets,
    )
