"""What every generating endpoint shares: one request becomes choices, each an engine generation.

`Generation.start` runs the choices of a request (n per prompt) and returns once every choice has
its first delta, so that a refusal (prompt too long, server busy) is still a plain JSON error
rather than a broken stream. The first choice of each prompt starts alone: once it has its first
token its prompt blocks are in the prefix cache, and the other n - 1 choices reuse them instead
of prefilling the prompt again. The engine generators are always closed when the request ends
or the client goes away (that is how the engine learns to cancel).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from fastapi import Request, Response
from sse_starlette import ServerSentEvent

from server.api.disconnect import ClientDisconnected, until_disconnected
from server.api.errors import APIError
from server.api.metrics import Metrics, RequestTimer
from server.api.protocol import TokenCounts
from server.api.sse import Framing, event_stream
from server.engine.types import EngineClient, EngineError, SamplingParams, StreamDelta, TokenLogprob, ToolCallDelta

T = TypeVar("T")

# A stream of one choice that has no first token after this long (a long prompt's prefill)
# starts without it, so that the client sees its response begin and the stream's pings keep it
# alive: coding agents drop a stream that sends nothing for minutes and send the request again.
# A refusal comes back sooner (the engine refuses a request when it takes it, within a step), so
# it is still a plain JSON error.
STREAM_START_S = 2.0


@dataclass
class ChoiceState:
    """Everything one choice has produced so far."""

    index: int
    prompt_tokens: int
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: dict[int, ToolCallDelta] = field(default_factory=dict)  # by index, arguments joined
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    stop_sequence: str | None = None  # the stop string that ended it, if one did

    def add(self, delta: StreamDelta) -> None:
        self.text.append(delta.text)
        self.logprobs.extend(delta.logprobs or [])
        for piece in delta.tool_calls or []:
            call = self.tool_calls.setdefault(piece.index, ToolCallDelta(piece.index, piece.id, piece.name))
            call.arguments += piece.arguments
        self.prompt_tokens = delta.prompt_tokens
        self.completion_tokens = delta.completion_tokens
        self.cached_tokens = delta.cached_tokens
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.stop_sequence = delta.stop_sequence or self.stop_sequence


class Generation:
    """The engine generations of one request: `len(prompts) * n` choices, indexed prompt-major."""

    def __init__(self, engine: EngineClient, request_id: str, n: int, timer: RequestTimer) -> None:
        self.engine = engine
        self.request_id = request_id
        self.n = n
        self.timer = timer
        self.choices: list[ChoiceState] = []
        self._streams: dict[int, AsyncGenerator[StreamDelta, None]] = {}
        self._firsts: dict[int, StreamDelta] = {}
        self._opening: dict[int, asyncio.Future[None]] = {}  # first deltas a started stream still waits for

    @classmethod
    async def start(
        cls,
        engine: EngineClient,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        timer: RequestTimer,
        stream: bool = False,
    ) -> Generation:
        """Every choice started and its first delta received (a `stream` of one choice: or
        `STREAM_START_S` passed); an engine refusal is raised here, with every generation
        already closed."""
        gen = cls(engine, request_id, n, timer)
        gen.choices = [ChoiceState(p * n + i, len(ids)) for p, ids in enumerate(prompts) for i in range(n)]
        try:
            if stream and len(gen.choices) == 1:
                first = gen._opening[0] = asyncio.ensure_future(gen._open(0, prompts[0], params))
                done, _ = await asyncio.wait({first}, timeout=STREAM_START_S)
                if done:
                    gen._opening.pop(0).result()
                return gen
            await asyncio.gather(*[gen._open(p * n, ids, params) for p, ids in enumerate(prompts)])
            await asyncio.gather(
                *[gen._open(p * n + i, ids, _seeded(params, i)) for p, ids in enumerate(prompts) for i in range(1, n)]
            )
        except BaseException:
            await gen.aclose()
            raise
        return gen

    async def _open(self, index: int, prompt_ids: list[int], params: SamplingParams) -> None:
        stream = self._streams[index] = self.engine.generate(f"{self.request_id}-{index}", prompt_ids, params)
        self._firsts[index] = await _next(stream)
        if index == 0:
            self.timer.first_token()

    async def deltas(self) -> AsyncIterator[tuple[ChoiceState, StreamDelta]]:
        """Every delta of every choice as it comes (the first deltas first), each already added to
        its choice's state; ends when every choice has finished."""
        queue: asyncio.Queue[tuple[int, StreamDelta | Exception]] = asyncio.Queue()

        async def pump(k: int) -> None:
            try:
                if k in self._opening:
                    await self._opening.pop(k)
                delta = self._firsts[k]
                while True:
                    await queue.put((k, delta))
                    if delta.finish_reason:
                        return
                    delta = await _next(self._streams[k])
            except Exception as exc:
                await queue.put((k, exc))

        pumps = [asyncio.create_task(pump(k)) for k in range(len(self.choices))]
        try:
            unfinished = len(self.choices)
            while unfinished:
                k, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                choice = self.choices[k]
                choice.add(item)
                self.timer.tokens(len(item.token_ids))
                unfinished -= bool(item.finish_reason)
                yield choice, item
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def collect(self) -> list[ChoiceState]:
        """Run every choice to its end."""
        async for _ in self.deltas():
            pass
        return self.choices

    async def aclose(self) -> None:
        """Close every generation (aborting the unfinished ones); idempotent."""
        for opening in self._opening.values():
            opening.cancel()
        await asyncio.gather(*self._opening.values(), return_exceptions=True)
        self._opening.clear()
        for stream in self._streams.values():
            await stream.aclose()
        self.timer.finished()

    def usage(self) -> TokenCounts:
        """Prompt tokens once per prompt (its n choices share it), completion tokens of every choice."""
        return TokenCounts(
            prompt=sum(c.prompt_tokens for c in self.choices[:: self.n]),
            completion=sum(c.completion_tokens for c in self.choices),
            cached=sum(c.cached_tokens for c in self.choices[:: self.n]),
        )


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    """Choice i of a seeded request draws from seed + i, so the n choices differ yet repeat."""
    return params if params.seed is None else replace(params, seed=params.seed + i)


async def _next(stream: AsyncGenerator[StreamDelta, None]) -> StreamDelta:
    """The next delta. A generator that ends without a finish_reason was ended by the engine."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise EngineError("the engine ended the request before it finished") from None


async def run(
    request: Request,
    start: Awaitable[Generation],
    respond: Callable[[Generation], T],
    events: Callable[[Generation], AsyncIterator[ServerSentEvent]] | None = None,
    framing: Framing | None = None,
) -> Response | T:
    """A request's generations to their answer: `respond(gen)` once every choice has finished,
    or, with `events`, an SSE stream of `events(gen)` ended as `framing` says (sse.py). A client
    gone before the answer gets 499, and its generations are closed (which aborts them)."""
    try:
        gen = await until_disconnected(request, start)
    except ClientDisconnected:
        return Response(status_code=499)
    if events is not None:
        return event_stream(events(gen), gen.aclose, gen.engine.shutdown, framing or Framing())
    try:
        await until_disconnected(request, gen.collect())
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await gen.aclose()
    return respond(gen)


class Service:
    """What an endpoint's service holds: the engine, the metrics, the most choices a request may ask."""

    def __init__(self, engine: EngineClient, metrics: Metrics, max_n: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_n = max_n

    def admit(self, model: str, choices: int) -> RequestTimer:
        """Refuse a request for another model or for too many choices; else start its timer."""
        self.check_model(model)
        if choices > self.max_n:
            raise APIError(400, f"n: at most {self.max_n} choices per request on this server (--max-n)", param="n")
        return self.metrics.timer()

    def check_model(self, model: str) -> None:
        """Refuse a request for a model this server does not serve."""
        if model != self.engine.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.engine.model_name}'",
                param="model",
                code="model_not_found",
            )
