"""The step loop: schedule, run the model, sample, stream each sequence's new text.

Everything here runs on the engine thread; `emit` callbacks hand deltas to other threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner
from .sampling import SamplerState, sample
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence
from .types import EngineError, StreamDelta, TokenLogprob



@dataclass
class EngineConfig(SchedulerConfig):
    max_model_len: int = 4096
    enable_prefix_caching: bool = True


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer, config: EngineConfig, num_blocks: int):
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.blocks = BlockManager(num_blocks, runner.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks)
        self.eos_ids = set(tokenizer.eos_token_ids)
        self.vocab_size = runner.model.args.vocab_size
        self.by_id: dict[str, Sequence] = {}
        self.counters = {"steps": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0,
                         "generated_tokens": 0, "preemptions": 0}

    # -- requests ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        try:
            seq.sampler = SamplerState(seq.params, seq.prompt_ids, self.vocab_size)
        except EngineError as exc:
            seq.emit(exc)
            return
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, seq.params.stop)
        self.by_id[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self.by_id.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq)

    def fail_all(self, error: EngineError) -> None:
        for seq in list(self.by_id.values()):
            self.abort(seq.request_id)
            seq.emit(error)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one step; False when there was nothing it could run."""
        self._expire(time.monotonic())
        plan = self.scheduler.schedule()
        self.counters["preemptions"] += len(plan.preempted)
        if plan.empty:
            return False
        sampled = plan.decodes + [s for s, n in plan.prefills if s.num_computed + n == len(s)]
        for seq, n in plan.prefills:
            if seq.num_computed == seq.num_cached_prompt and not seq.output_ids:
                self.counters["prompt_tokens"] += len(seq.prompt_ids)
                self.counters["cached_prompt_tokens"] += seq.num_cached_prompt
        logits = self.runner.run(plan)
        result = sample(logits, [s.sampler for s in sampled]) if sampled else None
        outputs = []
        if result is not None:
            outputs = [result.tokens]
            if any(s.params.logprobs for s in sampled):  # the log-softmax costs a pass over V
                outputs += [a for a in (result.logprobs, result.top_ids, result.top_logprobs) if a is not None]
        mx.eval(*outputs, *self.runner.cache_arrays())
        self.scheduler.advance(plan)
        self.counters["steps"] += 1
        if result is not None:
            self._append(sampled, result)
        return True

    def _append(self, seqs: list[Sequence], result) -> None:
        tokens = result.tokens.tolist()
        wants_logprobs = any(s.params.logprobs for s in seqs)
        logprobs = result.logprobs.tolist() if wants_logprobs else None
        top_ids = result.top_ids.tolist() if wants_logprobs and result.top_ids is not None else None
        top_lps = result.top_logprobs.tolist() if wants_logprobs and result.top_logprobs is not None else None
        self.counters["generated_tokens"] += len(tokens)
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            seq.output_ids.append(tok)
            seq.sampler.record(tok)
            finish = None
            if tok in self.eos_ids and not seq.params.ignore_eos:
                text, finish = seq.detokenizer.finish(), "stop"
            else:
                text = seq.detokenizer.add(tok)
                if seq.detokenizer.stopped:
                    finish = "stop"
                elif len(seq.output_ids) >= seq.params.max_tokens or len(seq) >= self.config.max_model_len:
                    text, finish = text + seq.detokenizer.finish(), "length"
            lp = None
            if seq.params.logprobs:
                k = seq.params.top_logprobs
                top = [(self._piece(t), l) for t, l in zip(top_ids[i][:k], top_lps[i][:k])] if k else []
                lp = [TokenLogprob(self._piece(tok), logprobs[i], top)]
            seq.emit(StreamDelta(
                text=text, token_ids=[tok], prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output_ids), cached_tokens=seq.num_cached_prompt,
                finish_reason=finish, logprobs=lp,
            ))
            if finish:
                self.by_id.pop(seq.request_id, None)
                self.scheduler.finish(seq)

    def _expire(self, now: float) -> None:
        for seq in [s for s in self.by_id.values() if s.deadline < now]:
            self.abort(seq.request_id)
            seq.emit(EngineError("request timed out"))

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "cache_blocks": len(self.blocks.blocks),
            "cache_blocks_free": self.blocks.num_free,
            "cache_usage": round(self.blocks.usage(), 4),
            **self.counters,
        }
