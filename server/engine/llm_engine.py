"""The engine: requests in (`add_request`), the step loop (schedule, run the model, sample,
stream each sequence's new text), outputs back (`generate`).

    engine = load_engine(EngineArgs(...))                         # factory.py
    outputs = engine.generate([prompt_ids, ...], SamplingParams(...))  # add all, step until idle

    rid = engine.add_request(prompt_ids, params, emit=on_delta)   # or step by hand: benchmarks,
    while engine.has_work:                                        # the async engine's thread
        engine.step()

Everything here runs on the engine thread; `emit` callbacks hand deltas to other threads.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx

from .args import EngineArgs
from .core.block_manager import BlockManager
from .core.scheduler import Scheduler, StepPlan
from .core.sequence import Sequence, Status
from .output.detokenizer import TokenStream
from .output.token_bytes import TokenBytes
from .sample.constraints import Constraints
from .sample.sampling import SampleResult, SamplerState, sample
from .types import (
    Emit,
    EngineError,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    StreamDelta,
    TokenLogprob,
    fit_to_context,
)


class Runner(Protocol):
    """What the step loop needs of a model runner (`ModelRunner`, or a test's stand-in)."""

    block_size: int
    num_blocks: int
    vocab_size: int

    def run(self, plan: StepPlan) -> mx.array: ...

    def cache_arrays(self) -> list[mx.array]: ...


@dataclass
class _Step:
    """A built step: its plan, the sequences it draws for (in row order), the draws."""

    plan: StepPlan
    sampled: list[Sequence]
    result: SampleResult | None
    outputs: list[mx.array]  # what the step must evaluate besides the cache: the draws (and logprobs)


class LLMEngine:
    """One model's engine. `args` is resolved (`max_model_len` set): see `factory.load_engine`."""

    def __init__(self, runner: Runner, tokenizer: Any, args: EngineArgs) -> None:
        if args.max_model_len is None:
            raise ValueError("EngineArgs.max_model_len must be resolved before building the engine")
        self.runner = runner
        self.tokenizer = tokenizer
        self.args = args
        self.max_model_len: int = args.max_model_len
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(args, self.blocks)
        self.eos_ids = set(tokenizer.eos_token_ids)
        self.token_bytes = TokenBytes(tokenizer)
        # Which decode backend runs, and the start-up check behind that choice (set by the factory).
        self.decode: dict[str, object] = {}
        self.constraints = Constraints(tokenizer, runner.vocab_size, self.eos_ids)
        self.by_id: dict[str, Sequence] = {}
        self.counters = {
            "steps": 0,
            "prompt_tokens": 0,
            "cached_prompt_tokens": 0,
            "generated_tokens": 0,
            "preemptions": 0,
        }
        self._in_flight: _Step | None = None  # queued, draws not read back (see step)
        self._request_ids = itertools.count()

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        emit: Emit | None = None,
    ) -> str:
        """Admit a request; its id (`request_id`, or a new one). Its deltas go to `emit` (None:
        nowhere); a request that cannot run (an `EngineError`) emits the reason as its only item."""
        if request_id is None:
            request_id = self._new_request_id()
        seq = Sequence(request_id, list(prompt_ids), params, emit=emit or _ignore)
        try:
            if not seq.prompt_ids:
                raise InvalidRequest("the prompt is empty", param="messages")
            seq.params = fit_to_context(
                seq.params, len(seq.prompt_ids), self.max_model_len, self.args.default_max_tokens
            )
            seq.sampler = SamplerState(seq.params, seq.prompt_ids, self.runner.vocab_size)
            seq.sampler.constraint = self.constraints.build(seq.params.constraint)
        except EngineError as exc:
            seq.emit(exc)
            return request_id
        seq.output = TokenStream(self.tokenizer, seq.prompt_ids, seq.params, self.eos_ids)
        self.by_id[seq.request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Add every prompt (with `params`, or one of `params` each), step until the engine has
        no work left, and return their outputs in prompt order."""
        each = params if isinstance(params, list) else [params] * len(prompts)
        outputs = [RequestOutput(self._new_request_id()) for _ in prompts]
        for prompt_ids, p, out in zip(prompts, each, outputs, strict=True):
            self.add_request(prompt_ids, p, out.request_id, out)
        while self.has_work:
            self.step()
        return outputs

    def _new_request_id(self) -> str:
        return f"engine-{next(self._request_ids)}"

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.by_id.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq)
        return seq

    def fail_all(self, error: EngineError) -> None:
        self._in_flight = None  # whatever it drew goes to nobody
        for seq in list(self.by_id.values()):
            self.abort(seq.request_id)
            seq.emit(error)
        self.blocks.forget_prefixes()  # a failed step's blocks were registered when it was built

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one step; False when there was nothing it could run.

        With `async_scheduling` the next step's graph is built (scheduled, run through the model,
        sampled: lazily) while the device still computes the previous step, which it takes its
        decode inputs from on the device; then the previous step's draws are read back and
        streamed, and only then is the new step queued. So the host builds a step while the device
        computes the last one, and every draw streams as soon as its step ends (queuing first would
        hold it back wherever `async_eval` returns late: on MLX's CPU backend it returned only after
        nearly all of the step had run). A sequence that turns out to have ended with a draw has
        one token computed in vain, which is dropped. Not after a step that drew for a constrained
        output: its next mask needs the draw.
        """
        previous, self._in_flight = self._in_flight, None
        if previous is not None and any(s.sampler and s.sampler.constraint for s in previous.sampled):
            self._read_back(previous)
            previous = None
        built = self._build()
        if previous is not None:
            self._read_back(previous)
        if built is not None:
            if built.result is None or self.args.async_scheduling == "off":
                # Also a step that draws nothing (a prompt's middle chunk): nothing would wait
                # for it, and a long prompt's chunks would all be queued at once, each holding
                # its buffers.
                mx.eval(*built.outputs, *self.runner.cache_arrays())
                self._read_back(built)
            else:
                mx.async_eval(*built.outputs, *self.runner.cache_arrays())  # type: ignore[no-untyped-call]
                self._in_flight = built
        return built is not None or previous is not None

    def _build(self) -> _Step | None:
        """Schedule a step and build its graph (lazy: nothing runs yet)."""
        plan = self.scheduler.schedule()
        self.counters["preemptions"] += len(plan.preempted)
        if plan.empty:
            return None
        sampled = plan.decodes + [s for s, n in plan.prefills if s.num_computed + n == len(s)]
        for seq, _ in plan.prefills:
            if seq.num_computed == seq.num_cached_prompt and not seq.output_ids:
                self.counters["prompt_tokens"] += len(seq.prompt_ids)
                self.counters["cached_prompt_tokens"] += seq.num_cached_prompt
        logits = self.runner.run(plan)
        samplers = [s.sampler for s in sampled if s.sampler is not None]
        masks = None
        if any(s.constraint is not None for s in samplers):
            # The forward pass runs while llguidance fills the masks on the CPU: the mask of a
            # step depends only on tokens sampled before it.
            mx.async_eval(logits)  # type: ignore[no-untyped-call]
            masks = mx.array(self.constraints.fill_masks([s.constraint for s in samplers]))
        result = sample(logits, samplers, masks) if sampled else None
        outputs = []
        if result is not None:
            outputs = [result.tokens]
            if any(s.params.logprobs for s in sampled):  # the log-softmax costs a pass over V
                outputs += [a for a in (result.logprobs, result.top_ids, result.top_logprobs) if a is not None]
            for row, seq in enumerate(sampled):
                assert seq.sampler is not None  # set by add()
                seq.sampler.record(result.tokens, row)
                seq.num_pending += 1
                seq.pending = (result.tokens, row)
        self.scheduler.advance(plan)
        # Blocks this step fills are shareable at once: a step that reads one is queued after it.
        for seq in [*plan.decodes, *(s for s, _ in plan.prefills)]:
            self.blocks.commit(seq)
        return _Step(plan, sampled, result, outputs)

    def _read_back(self, step: _Step) -> None:
        """Wait for a step's draws; stream them and end what they end."""
        if step.result is not None:
            self._append(step.sampled, step.result)
        self.scheduler.step_done(step.plan)
        self.counters["steps"] += 1

    def _append(self, seqs: list[Sequence], result: SampleResult) -> None:
        tokens: list[int] = result.tokens.tolist()  # type: ignore[assignment]
        wants_logprobs = any(s.params.logprobs for s in seqs)
        logprobs: list[float] = result.logprobs.tolist() if wants_logprobs else []  # type: ignore[assignment]
        top_ids: list[list[int]] = []
        top_lps: list[list[float]] = []
        if wants_logprobs and result.top_ids is not None and result.top_logprobs is not None:
            top_ids, top_lps = result.top_ids.tolist(), result.top_logprobs.tolist()  # type: ignore[assignment]
        for i, (seq, tok) in enumerate(zip(seqs, tokens, strict=True)):
            seq.num_pending -= 1
            if not seq.num_pending:
                seq.pending = None
            if seq.status is Status.FINISHED:  # ended with an earlier draw, aborted or failed
                continue
            assert seq.sampler is not None and seq.output is not None  # set by add()
            self.counters["generated_tokens"] += 1
            seq.append(tok)
            constraint = seq.sampler.constraint
            if constraint is not None:
                constraint.consume(tok)
            text, finish = seq.output.add(tok, complete=constraint is not None and constraint.done)
            lp = None
            # EOS ends the text without adding to it, so it has no logprob entry either.
            if seq.params.logprobs and not (finish and tok in self.eos_ids and not seq.params.ignore_eos):
                k = seq.params.top_logprobs
                top = [(self._piece(t), v) for t, v in zip(top_ids[i][:k], top_lps[i][:k], strict=True)] if k else []
                lp = [TokenLogprob(self._piece(tok), logprobs[i], top, bytes=list(self.token_bytes(tok)))]
            seq.emit(
                StreamDelta(
                    text=text,
                    token_ids=[tok],
                    prompt_tokens=len(seq.prompt_ids),
                    completion_tokens=len(seq.output_ids),
                    cached_tokens=seq.num_cached_prompt,
                    finish_reason=finish,
                    logprobs=lp,
                    tool_calls=seq.output.pop_tool_calls(),
                )
            )
            if finish:
                self.by_id.pop(seq.request_id, None)
                self.scheduler.finish(seq)

    def _piece(self, token_id: int) -> str:
        piece: str = self.tokenizer.decode([token_id])
        return piece

    def stats(self) -> dict[str, Any]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "cache_blocks": len(self.blocks.blocks),
            "cache_blocks_free": self.blocks.num_free,
            "cache_usage": round(self.blocks.usage(), 4),
            "decode": self.decode,
            **self.counters,
        }


def _ignore(_: StreamDelta | Exception) -> None:
    """The `emit` of a request nobody reads (warm-up; on tensor-parallel ranks other than 0)."""
