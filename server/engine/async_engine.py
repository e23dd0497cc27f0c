"""The bridge between asyncio and the engine thread, which owns all MLX work.

Requests enter through a thread-safe queue; the thread steps the engine while it has work and
sleeps on the queue while it has none. Deltas flow back through `loop.call_soon_threadsafe` into
one asyncio queue per request. Closing a request's generator early (client gone) aborts it, and
the engine frees its blocks at the start of the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from functools import partial
from typing import Any

import mlx.core as mx

from .distributed import AddRequest, Event, EventChannel, with_fixed_seed
from .llm_engine import LLMEngine
from .types import (
    Emit,
    EngineError,
    EngineOverloaded,
    EngineShutdown,
    InvalidRequest,
    PromptTooLong,
    RequestTimeout,
    SamplingParams,
    StreamDelta,
    ToolSpec,
)

log = logging.getLogger(__name__)

# Tensor parallel: how long shutdown waits for the engine thread's turn before it takes the turn
# for stuck on a dead rank; under the SSE streams' grace period (api.sse.SHUTDOWN_GRACE_S, 5 s),
# so that they still receive the error event.
STUCK_TURN_S = 3.0


class AsyncEngine:
    """An `EngineClient` (see types.py) over an `LLMEngine` running on its own thread."""

    def __init__(self, make_engine: Callable[[], LLMEngine], channel: EventChannel | None = None) -> None:
        """`make_engine` runs on the engine thread: MLX arrays and streams belong to the thread
        that made them, so the model is loaded there too. Its errors are raised here. With
        `channel`, this is rank 0 of a tensor-parallel set (see distributed.py)."""
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._channel = channel
        self._deadlines: dict[str, float] = {}  # request id -> when it times out (engine thread)
        self.failed = False  # a tensor-parallel rank failed
        # Tensor parallel: when this turn's exchange began (None between turns): the exchange and
        # the step's all-reduces wait on the other ranks.
        self._turn_since: float | None = None
        ready: queue.SimpleQueue[LLMEngine | BaseException] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(make_engine, ready), name="engine", daemon=True)
        self._thread.start()
        engine = ready.get()
        if isinstance(engine, BaseException):
            self._thread.join()
            raise engine
        self.engine: LLMEngine = engine
        self.args = engine.args
        self.model_name = engine.args.model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        # No token is longer than this many characters, so a prompt of more characters than
        # max_model_len times this cannot fit and is refused before tokenizing.
        self._max_token_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        if channel is not None:
            threading.Thread(target=self._watch_ranks, name="rank-watchdog", daemon=True).start()
        self._in_flight = 0  # generations started and not ended; read and written on the event loop

    # -- EngineClient -------------------------------------------------------------------------
    async def encode_chat(self, messages: list[dict[str, Any]], tools: list[ToolSpec] | None = None) -> list[int]:
        # A worker thread: a long prompt's template and tokenization would stall every stream.
        return await asyncio.to_thread(self._encode_chat, messages, tools)

    async def encode_text(self, text: str) -> list[int]:
        return await asyncio.to_thread(self._encode_text, text)

    def decode(self, token_ids: list[int]) -> str:
        text: str = self.tokenizer.decode(token_ids)
        return text

    def _encode_text(self, text: str) -> list[int]:
        self._check_length(len(text), "prompt")
        return list(self.tokenizer.encode(text))

    def _check_length(self, chars: int, what: str) -> None:
        if chars > self.max_model_len * self._max_token_chars:
            raise PromptTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens, and the {what} "
                f"holds {chars} characters: more than that many tokens can hold. Please shorten it.",
                param="prompt" if what == "prompt" else "messages",
            )

    def _encode_chat(self, messages: list[dict[str, Any]], tools: list[ToolSpec] | None) -> list[int]:
        self._check_length(sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str)), "messages")
        try:
            return list(
                self.tokenizer.apply_chat_template(
                    messages, tools=[t.template() for t in tools] if tools else None, add_generation_prompt=True
                )
            )
        except Exception as exc:  # the model's own jinja template rejected these messages
            raise InvalidRequest(f"the model's chat template rejected the messages: {exc}", param="messages") from exc

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[StreamDelta, None]:
        if self._stopping.is_set():
            raise EngineShutdown("server is shutting down")
        if self._in_flight >= self.args.max_requests:
            raise EngineOverloaded(
                f"the server is at its limit of {self.args.max_requests} running and waiting requests; retry shortly"
            )
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[StreamDelta | Exception] = asyncio.Queue()
        request = AddRequest(request_id, list(prompt_ids), params)
        self._inbox.put(("add", (request, partial(_deliver, loop, deltas))))
        self._in_flight += 1
        done = False
        try:
            while not done:
                item = await deltas.get()
                if isinstance(item, Exception):
                    done = True
                    raise item
                done = item.finish_reason is not None
                yield item
        finally:
            self._in_flight -= 1
            if not done:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> dict[str, Any]:
        return {"model": self.model_name, "max_model_len": self.max_model_len, **self.engine.stats()}

    def shutdown(self) -> None:
        """End every live generation with an error event and stop the thread."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=30 if self._channel is None else STUCK_TURN_S)
        if self._thread.is_alive() and self._turn_since is not None:
            # Tensor parallel: the turn still waits on a collective, so a rank is gone (a healthy
            # turn is one step). Fail the streams now, while they can still take an error event.
            log.error("a tensor-parallel turn has not ended at shutdown: a rank is gone")
            self._fail_ranks(self.engine)

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self, make_engine: Callable[[], LLMEngine], ready: queue.SimpleQueue[LLMEngine | BaseException]) -> None:
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        try:
            try:
                engine = make_engine()
            except BaseException as exc:
                ready.put(exc)
                return
            ready.put(engine)
            self._loop(engine)
        finally:
            # A stream left behind by a finished thread aborts the process at exit.
            mx.clear_streams()

    def _loop(self, engine: LLMEngine) -> None:
        """Each turn: this turn's events (requests added, aborted, expired; the stop), shared with
        every other rank when serving tensor-parallel, applied, then one step."""
        progressed = True
        local: dict[str, Emit] = {}  # where the requests added here, not yet in the engine, stream
        while True:
            # Sleep on the inbox when idle, and when the last step could run nothing.
            events = self._events(engine, local, block=not (engine.has_work and progressed))
            if self._channel is not None:
                self._turn_since = time.monotonic()
                try:
                    events = self._channel.exchange(events)
                except Exception:
                    log.exception("a tensor-parallel rank failed")
                    self._fail_ranks(engine)
                    return
            if apply_events(engine, events, local):
                break
            try:
                progressed = engine.step()
                self._turn_since = None
            except Exception as exc:  # a failed step must not take the server down
                if self._channel is not None:
                    # Tensor parallel: a collective lost its peer, or this rank's state now differs
                    # from the others'; the set cannot go on in step.
                    log.exception("engine step failed under tensor parallelism")
                    self._fail_ranks(engine)
                    return
                log.exception("engine step failed; failing the requests in flight")
                engine.fail_all(EngineError(f"internal engine error: {type(exc).__name__}"))
        engine.fail_all(EngineShutdown("server is shutting down"))
        engine.close()

    def _watch_ranks(self) -> None:
        """A dead rank can leave a collective waiting forever, the turn's exchange or an all-reduce
        inside the step (a peer's closed socket is not always an error to the collective): a turn
        past `rank_timeout` stops the whole set."""
        while not self._stopping.is_set() and not self.failed:
            since = self._turn_since
            if since is not None and time.monotonic() - since > self.args.rank_timeout:
                log.error("no answer from the other tensor-parallel ranks for %.0f s", self.args.rank_timeout)
                self._fail_ranks(self.engine)
                return
            time.sleep(1.0)

    def _fail_ranks(self, engine: LLMEngine) -> None:
        """Fail every live request and stop the server; serve() then exits non-zero, so that
        launchd restarts the set."""
        self.failed = True
        engine.fail_all(EngineError("a tensor-parallel rank failed; the server is stopping"))
        if not self._stopping.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    def _events(self, engine: LLMEngine, local: dict[str, Emit], block: bool) -> list[Event]:
        """The inbox's requests and aborts, the requests past their deadline, and the stop."""
        events: list[Event] = []
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                kind, payload = item
                if kind == "add":
                    request, emit = payload
                    local[request.request_id] = emit
                    if self._channel is not None:
                        request = replace(request, params=with_fixed_seed(request.params))
                    self._deadlines[request.request_id] = time.monotonic() + self.args.request_timeout
                    events.append(("add", request))
                elif kind == "abort":
                    events.append(("abort", payload))
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        now = time.monotonic()
        for request_id, deadline in list(self._deadlines.items()):
            if request_id not in engine.by_id and request_id not in local:
                del self._deadlines[request_id]  # finished
            elif deadline < now:
                del self._deadlines[request_id]
                events.append(("expire", request_id))
        if self._stopping.is_set():
            events.append(("stop", None))
        return events


def apply_events(engine: LLMEngine, events: list[Event], local: dict[str, Emit]) -> bool:
    """Apply one turn's events to `engine`, the same on every rank; True when told to stop.
    A request added on this rank (rank 0) streams to its client (`local`); on other ranks it
    streams to nobody."""
    for kind, payload in events:
        if kind == "add":
            request: AddRequest = payload
            engine.add_request(
                request.prompt_ids, request.params, request.request_id, local.pop(request.request_id, None)
            )
        elif kind == "abort":
            aborted = engine.abort(payload)
            if aborted is not None:  # its generator (if still open) ends with this error
                aborted.emit(EngineError("the request was aborted"))
        elif kind == "expire":
            expired = engine.abort(payload)
            if expired is not None:
                expired.emit(RequestTimeout("request timed out"))
        elif kind == "stop":
            return True
    return False


def run_follower(engine: LLMEngine, channel: EventChannel) -> None:
    """A rank other than 0: apply rank 0's events and run the same steps until it stops."""
    while not apply_events(engine, channel.exchange([]), {}):
        engine.step()
    blocks = engine.blocks
    log.info("rank %d stopped: %d of %d cache blocks free", channel.rank, blocks.num_free, len(blocks.blocks))


def _deliver(
    loop: asyncio.AbstractEventLoop, deltas: asyncio.Queue[StreamDelta | Exception], item: StreamDelta | Exception
) -> None:
    """Hand an item to its request's event loop; a closed loop has nobody left to read it (and
    raising here would kill the engine thread for every other request)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(deltas.put_nowait, item)
