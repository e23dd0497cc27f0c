"""The step loop: schedule, run the model, sample, stream each sequence's new text.

Everything here runs on the engine thread; `emit` callbacks hand deltas to other threads.

Prefix-cache publication (`BlockManager.commit`) happens here, when a block's contents are final:

- a block of prompt tokens when the step that writes it is built: its ids are known from the
  start, and a step that reads it is queued after the one that writes it, so `n` choices of one
  prompt and concurrent requests share it at once;
- a block holding generated tokens when the step that writes its last position is read back: by
  then every token in it has been accepted (read back, and not rolled back) and written, so a
  step that fails leaves none of them registered. A step that verifies a draft computes positions
  for drafted tokens, and the ones it rejects are rolled back (`Scheduler.rollback`) before its
  draws are accepted or its blocks published, so no block holding one is ever published;
- when a sequence lets go of its blocks (`BlockManager.release`), the full ones of accepted tokens
  that its steps write: a freed block cannot be published later.

A failed step drops every registration (`fail_all`): prompt blocks, and those a sequence lets go
of, may be published before the steps that write them have run.
"""

from __future__ import annotations

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
from .sample.logits_processors import logits_processors
from .sample.sampling import Draw, SampleResult, SamplerState, sample
from .spec_decode.speculator import Speculator
from .types import EngineError, InvalidRequest, StreamDelta, TokenLogprob, fit_to_context


class Runner(Protocol):
    """What the step loop needs of a model runner (`ModelRunner`, or a test's stand-in)."""

    block_size: int
    num_blocks: int
    vocab_size: int

    def run(self, plan: StepPlan) -> mx.array: ...

    def cache_arrays(self) -> list[mx.array]: ...


@dataclass
class _Step:
    """A built step: its plan, the sequences it draws for (in row order, with their row counts),
    the draws, and where it leaves each sequence it runs."""

    plan: StepPlan
    samples: list[tuple[Sequence, int]]
    result: SampleResult | None
    outputs: list[mx.array]  # what the step must evaluate besides the cache: the draws (and logprobs)
    # (sequence, positions it has computed with this step): what its read back may publish.
    reached: list[tuple[Sequence, int]]
    drafts: dict[Sequence, list[int]]  # the drafts it verifies


class LLMEngine:
    """One model's engine. `args` is resolved (`max_model_len` set): see `factory.load_engine`.
    `decode` says which decode backend the runner runs and the start-up check behind that choice
    (`selfcheck.Verdict.as_dict()`; empty for a runner nobody checked), for /health."""

    def __init__(
        self, runner: Runner, tokenizer: Any, args: EngineArgs, *, decode: dict[str, object] | None = None
    ) -> None:
        if args.max_model_len is None:
            raise ValueError("EngineArgs.max_model_len must be resolved before building the engine")
        self.runner = runner
        self.tokenizer = tokenizer
        self.args = args
        self.max_model_len: int = args.max_model_len
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(args, self.blocks)
        self.speculator = Speculator(args.speculative, args.num_speculative_tokens, args.speculative_max_batch)
        self.eos_ids = set(tokenizer.eos_token_ids)
        self.token_bytes = TokenBytes(tokenizer)
        self.decode = decode or {}
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

    # -- requests ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Admit a request, or emit the reason it cannot run (an `EngineError`) as its only item."""
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
            return
        seq.output = TokenStream(self.tokenizer, seq.prompt_ids, seq.params, self.eos_ids)
        self.by_id[seq.request_id] = seq
        self.scheduler.add(seq)

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
        self.blocks.forget_prefixes()  # some blocks are published before their step has run

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
        output (its next mask needs the draw), nor while sequences may draft (a draft follows the
        newest token, and a verified one decides where the sequence goes on).
        """
        previous, self._in_flight = self._in_flight, None
        if previous is not None and (
            previous.drafts
            or self.speculator.active(len(self.scheduler.running))
            or any(s.sampler and s.sampler.constraint for s, _ in previous.samples)
        ):
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
        self.speculator.propose(self.scheduler.running)
        plan = self.scheduler.schedule()
        self.counters["preemptions"] += len(plan.preempted)
        drafts = {seq: seq.draft for seq, n in plan.decodes if n > 1}
        if plan.empty:
            return None
        samples = plan.samples
        for seq, _ in plan.prefills:
            if seq.num_computed == seq.num_cached_prompt and not seq.output_ids:
                self.counters["prompt_tokens"] += len(seq.prompt_ids)
                self.counters["cached_prompt_tokens"] += seq.num_cached_prompt
        logits = self.runner.run(plan)
        for seq in self.scheduler.running + plan.preempted:
            seq.draft = []  # verified by this step, or to be drafted again
        rows = [self._sampler(seq) for seq, n in samples for _ in range(n)]
        result = None
        outputs = []
        if samples:
            chain = logits_processors(rows, self.constraints, forward=logits)
            result = sample(logits, rows, chain, [n for _, n in samples])
            outputs = [result.tokens]
            if any(s.params.logprobs for s, _ in samples):  # the log-softmax costs a pass over V
                outputs += [a for a in (result.logprobs, result.top_ids, result.top_logprobs) if a is not None]
            row = 0
            for seq, n in samples:
                self._sampler(seq).record(result.tokens, row, n)
                row += n
                seq.num_pending += n
                seq.pending = (result.tokens, row - 1)
        self.scheduler.advance(plan)
        for seq, _ in plan.prefills:  # the prompt blocks it writes (a decode writes none)
            self.blocks.commit(seq, len(seq.prompt_ids))
        reached = [(seq, seq.num_computed) for seq, _ in plan.decodes + plan.prefills]
        return _Step(plan, samples, result, outputs, reached, drafts)

    def _read_back(self, step: _Step) -> None:
        """Wait for a step's draws; stream them, end what they end, and publish the blocks the
        step has finished writing (see the module docstring)."""
        if step.result is not None:
            self._append([seq for seq, _ in step.samples], step.result, step.drafts)
        for seq, reached in step.reached:
            if seq.status is Status.RUNNING:  # else it let go of its blocks since
                self.blocks.commit(seq, reached)
        self.scheduler.step_done(step.plan)
        self.counters["steps"] += 1

    def _append(self, seqs: list[Sequence], result: SampleResult, drafts: dict[Sequence, list[int]]) -> None:
        """Hand each sequence its draws of a step, in order: each goes through the constraint,
        EOS, stop strings and max_tokens, and the first that ends the output ends it there (the
        draws after it are dropped). A sequence that verified a draft keeps the draws its
        speculator accepts, and first rolls back the positions of the drafted tokens it rejects."""
        wants_logprobs = any(s.params.logprobs for s in seqs)
        for seq, draws in zip(seqs, result.read_back(wants_logprobs), strict=True):
            seq.num_pending -= len(draws)
            if not seq.num_pending:
                seq.pending = None
            if seq in drafts:
                kept = self.speculator.verified(seq, drafts[seq], [d.token for d in draws])
                if seq.status is Status.RUNNING and kept < len(draws):
                    self.scheduler.rollback(seq, len(draws) - kept)
                    self._sampler(seq).rewind(len(draws) - kept)
                draws = draws[:kept]
            for draw in draws:
                if seq.status is Status.FINISHED:  # ended with an earlier draw, aborted or failed
                    break
                self._accept(seq, draw)

    def _accept(self, seq: Sequence, draw: Draw) -> None:
        """Append one drawn token to a running sequence's output and stream what it releases."""
        assert seq.sampler is not None and seq.output is not None  # set by add()
        tok = draw.token
        self.counters["generated_tokens"] += 1
        seq.append(tok)
        constraint = seq.sampler.constraint
        if constraint is not None:
            constraint.consume(tok)
        text, finish = seq.output.add(tok, complete=constraint is not None and constraint.done)
        lp = None
        # EOS ends the text without adding to it, so it has no logprob entry either.
        if seq.params.logprobs and not (finish and tok in self.eos_ids and not seq.params.ignore_eos):
            top = [(self._piece(t), v) for t, v in draw.top[: seq.params.top_logprobs]]
            lp = [TokenLogprob(self._piece(tok), draw.logprob, top, bytes=list(self.token_bytes(tok)))]
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

    @staticmethod
    def _sampler(seq: Sequence) -> SamplerState:
        assert seq.sampler is not None  # set by add()
        return seq.sampler

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
            **self.speculator.stats(),
        }
