"""The engine: requests in (`add_request`), the step loop (schedule, run the model, sample,
stream each sequence's new text), outputs back (`generate`).

    engine = load_engine(EngineArgs(...))                         # factory.py
    outputs = engine.generate([prompt_ids, ...], SamplingParams(...))  # add all, step until idle

    rid = engine.add_request(prompt_ids, params, emit=on_delta)   # or step by hand: benchmarks,
    while engine.has_work:                                        # the async engine's thread
        engine.step()

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

The disk tier (`DiskTier`, over disk_cache.py), when there is one:

- writes prompt blocks only: the blocks a later request can hit (a conversation's next turn, an
  agent's resent context) are those of prompts, and a turn's generated tokens come back as the
  next turn's prompt, written then; generated blocks are most of what a server computes and
  rarely hit. A step that computes prompt blocks not on disk yet also gathers their bytes
  (`export_blocks`, evaluated with the step); its read back hands them to the background writer.
- reads before admission: a request whose prompt continues past its cached prefix in blocks on
  disk waits, out of the scheduler, while the reader thread reads them; then its blocks are
  published into free pool blocks (`BlockManager.adopt`), written there (`import_blocks`: lazy,
  evaluated with the next step), and the request is scheduled as usual, finding them as hits.
"""

from __future__ import annotations

import itertools
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from .args import EngineArgs
from .core.block_manager import BlockManager
from .core.scheduler import Scheduler, StepPlan
from .core.sequence import Sequence, Status
from .disk_cache import DiskCache, block_keys
from .output.detokenizer import TokenStream
from .output.token_bytes import TokenBytes
from .sample.constraints import Constraints
from .sample.logits_processors import logits_processors
from .sample.sampling import Draw, SampleResult, SamplerState, sample
from .spec_decode.speculator import Speculator
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

    def export_blocks(self, block_ids: list[int]) -> mx.array: ...

    def import_blocks(self, block_ids: list[int], data: np.ndarray) -> None: ...


@dataclass
class DiskTier:
    """The engine's disk tier: the files, and the model fingerprint its keys start from."""

    cache: DiskCache
    fingerprint: bytes


@dataclass
class _Loading:
    """A request waiting for its blocks from disk: blocks `first`.. of its prompt, being read."""

    seq: Sequence
    first: int
    payloads: Future[list[bytes]]


@dataclass
class _Save:
    """Prompt blocks a step computes, for the disk tier: keys, token ids, and their bytes
    (`ModelRunner.export_blocks`, evaluated with the step)."""

    keys: list[bytes]
    chunks: list[tuple[int, ...]]
    data: mx.array


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
    save: _Save | None = None


class LLMEngine:
    """One model's engine. `args` is resolved (`max_model_len` set): see `factory.load_engine`.
    `decode` says which decode backend the runner runs and the start-up check behind that choice
    (`selfcheck.Verdict.as_dict()`; empty for a runner nobody checked), for /health."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Any,
        args: EngineArgs,
        *,
        decode: dict[str, object] | None = None,
        disk: DiskTier | None = None,
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
            "cached_prompt_tokens_disk": 0,
        }
        self._in_flight: _Step | None = None  # queued, draws not read back (see step)
        self._request_ids = itertools.count()
        self.disk = disk if args.enable_prefix_caching else None
        self._loading: dict[str, _Loading] = {}  # by request id, in arrival order
        # Request id -> (its cached prompt tokens in memory, those read from disk) when its disk
        # blocks were published, until its first step counts its hits by tier.
        self._disk_hits: dict[str, tuple[int, int]] = {}

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
        if not self._read_from_disk(seq):
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
        self._disk_hits.pop(request_id, None)
        if seq is not None and self._loading.pop(request_id, None) is not None:
            seq.status = Status.FINISHED  # never scheduled: no blocks to give back
        elif seq is not None:
            self.scheduler.finish(seq)
        return seq

    def fail_all(self, error: EngineError) -> None:
        self._in_flight = None  # whatever it drew goes to nobody
        for seq in list(self.by_id.values()):
            self.abort(seq.request_id)
            seq.emit(error)
        self.blocks.forget_prefixes()  # some blocks are published before their step has run

    def close(self) -> None:
        """Write what the disk tier has queued (at shutdown)."""
        if self.disk is not None:
            self.disk.cache.close()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None or bool(self._loading)

    # -- the disk tier ----------------------------------------------------------------------
    def _read_from_disk(self, seq: Sequence) -> bool:
        """Start reading the blocks of `seq`'s prompt that follow its cached prefix from disk, if
        the next one is there; True if `seq` now waits for them (`_publish_loaded`)."""
        if self.disk is None:
            return False
        bs = self.runner.block_size
        full = (len(seq.token_ids) - 1) // bs  # as `match_prefix`: at least one token left to compute
        first = len(self.blocks.match_prefix(seq.token_ids))
        if first >= full:
            return False
        keys = block_keys(self.disk.fingerprint, seq.token_ids, full, bs)[first:]
        if not self.disk.cache.contains(keys[0]):
            return False
        chunks = [tuple(seq.token_ids[i * bs : (i + 1) * bs]) for i in range(first, full)]
        self._loading[seq.request_id] = _Loading(seq, first, self.disk.cache.load(keys, chunks))
        return True

    def _publish_loaded(self, idle: bool) -> None:
        """Put the blocks read for waiting requests into the pool and schedule those requests.
        With nothing else to run (`idle`: no step in flight), wait for the first read to end."""
        if not self._loading:
            return
        if idle and not self.scheduler.has_work:
            wait([x.payloads for x in self._loading.values()], return_when=FIRST_COMPLETED)
        for rid, loading in list(self._loading.items()):
            if not loading.payloads.done():
                continue
            del self._loading[rid]
            seq, payloads = loading.seq, loading.payloads.result()
            cached = len(self.blocks.match_prefix(seq.token_ids))
            end = loading.first + len(payloads)
            # Blocks before `first` evicted since the read began: these would hang off nothing.
            if loading.first <= cached < end:
                first, ids = self.blocks.adopt(seq.token_ids, end - cached)
                if ids:
                    rows = payloads[first - loading.first : first - loading.first + len(ids)]
                    self.runner.import_blocks(ids, np.frombuffer(b"".join(rows), np.uint8).reshape(len(ids), -1))
                    bs = self.runner.block_size
                    self._disk_hits[rid] = (first * bs, len(ids) * bs)
            self.scheduler.add(seq)

    def _saves(self, prefills: list[tuple[Sequence, int]], committed: list[int]) -> _Save | None:
        """The prompt blocks a step's prefills computed and published (each from its
        `committed` count on) that are not on disk yet, their bytes gathered after the step."""
        if self.disk is None:
            return None
        bs = self.runner.block_size
        keys: list[bytes] = []
        chunks: list[tuple[int, ...]] = []
        block_ids: list[int] = []
        for (seq, _), first in zip(prefills, committed, strict=True):
            last = seq.num_committed_blocks
            if last <= first:
                continue
            seq_keys = block_keys(self.disk.fingerprint, seq.token_ids, last, bs)
            for i in range(first, last):
                if not self.disk.cache.contains(seq_keys[i]):
                    keys.append(seq_keys[i])
                    chunks.append(tuple(seq.token_ids[i * bs : (i + 1) * bs]))
                    block_ids.append(seq.block_table[i])
        return _Save(keys, chunks, self.runner.export_blocks(block_ids)) if keys else None

    def _write_saves(self, save: _Save) -> None:
        """Hand a step's gathered prompt blocks to the disk tier's writer (the step has run)."""
        assert self.disk is not None
        rows = np.array(save.data)
        for key, chunk, row in zip(save.keys, save.chunks, rows, strict=True):
            self.disk.cache.put(key, chunk, row)

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
        self._publish_loaded(idle=previous is None)
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
                in_memory, from_disk = self._disk_hits.pop(seq.request_id, (0, 0))
                self.counters["cached_prompt_tokens_disk"] += min(from_disk, max(0, seq.num_cached_prompt - in_memory))
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
        committed = [seq.num_committed_blocks for seq, _ in plan.prefills]
        for seq, _ in plan.prefills:  # the prompt blocks it writes (a decode writes none)
            self.blocks.commit(seq, len(seq.prompt_ids))
        save = self._saves(plan.prefills, committed)
        if save is not None:
            outputs.append(save.data)
        reached = [(seq, seq.num_computed) for seq, _ in plan.decodes + plan.prefills]
        return _Step(plan, samples, result, outputs, reached, drafts, save)

    def _read_back(self, step: _Step) -> None:
        """Wait for a step's draws; stream them, end what they end, and publish the blocks the
        step has finished writing (see the module docstring)."""
        if step.result is not None:
            self._append([seq for seq, _ in step.samples], step.result, step.drafts)
        if step.save is not None:
            self._write_saves(step.save)
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
                stop_sequence=seq.output.stop_sequence,
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
            **(self.disk.cache.stats() if self.disk is not None else {}),
            **self.speculator.stats(),
        }


def _ignore(_: StreamDelta | Exception) -> None:
    """The `emit` of a request nobody reads (warm-up; on tensor-parallel ranks other than 0)."""
