"""Which sequences run in the next step, and how many tokens of each.

Each step has a token budget. Decoding sequences go first, one token each, so running streams keep
flowing. Prompts then share a bounded prefill budget, first come first served: prefills already
running continue oldest first, then waiting requests are admitted in arrival order while blocks
and slots last, each taking at most `prefill_chunk_size` tokens of what is left. So one prompt (or
a few short ones) advances at a time and reaches its first token soonest, instead of every
waiting prompt crawling forward together.

The prefill budget of a step that also decodes is the smallest of what the token budget leaves,
`max_prefill_tokens_per_step`, and, with `target_step_ms`, the prompt tokens that fit in that
time next to the decodes, from measured step times (`PrefillPacer`, fed by `step_done`); a step
with nothing to decode prefills as much as the token budget allows. See docs/serving.md.

When a running sequence cannot grow, the newest running one is preempted: its blocks go back
(its full blocks stay cached) and it is recomputed later.

The result is a `StepPlan` of plain data, so that several ranks can apply the same decisions.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..args import EngineArgs
from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class StepPlan:
    # (sequence, number of positions to run): decodes first, then prefill chunks. A decode runs
    # its newest token and the tokens drafted after it (`Sequence.draft`), and samples every
    # position it runs; a prefill chunk samples only its last, and only where it reaches the end.
    decodes: list[tuple[Sequence, int]] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.decodes) + sum(n for _, n in self.prefills)

    @property
    def samples(self) -> list[tuple[Sequence, int]]:
        """The sequences the step draws for, in the order of their logits rows, each with the
        number of positions it samples. Read before `Scheduler.advance` counts the step."""
        return self.decodes + [(s, 1) for s, n in self.prefills if s.num_computed + n == len(s)]


class PrefillPacer:
    """How many prompt tokens a step that decodes may add to stay near the target step time.

    A feedback loop on measured step times: after a step that decoded and prefilled `p` tokens in
    `t` seconds, the next such step may prefill about `p * target / t` (the change bounded to a
    factor of two per step). Its fixed point is a step of the target length whatever the decode
    batch costs, and it follows the batch size and the prompt lengths as they change.
    """

    def __init__(self, target_s: float, floor: int, ceiling: int) -> None:
        self.target_s = target_s
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.limit = self.ceiling  # start optimistic: the first steps measure

    def observe(self, seconds: float, decodes: int, prefill_tokens: int) -> None:
        if not decodes or not prefill_tokens or seconds <= 0:
            return
        ratio = min(2.0, max(0.5, self.target_s / seconds))
        self.limit = int(min(self.ceiling, max(self.floor, prefill_tokens * ratio)))


class Scheduler:
    def __init__(
        self, config: EngineArgs, blocks: BlockManager, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        ceiling = min(
            config.max_prefill_tokens_per_step or config.max_num_batched_tokens, config.max_num_batched_tokens
        )
        # At least a block's worth per step, so prompts advance however slow decoding is.
        self.pacer = (
            PrefillPacer(config.target_step_ms / 1000, min(blocks.block_size, ceiling), ceiling)
            if config.target_step_ms is not None
            else None
        )
        self._clock = clock
        self._last_done: float | None = None  # when the last step's draws came back, while running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if (
                seq.status is Status.RUNNING
                and not seq.is_prefilling
                and not seq.drawn_all
                and self._make_room(seq, n := 1 + len(seq.draft), plan)
            ):
                plan.decodes.append((seq, n))
                budget -= n
        budget = min(budget, self.prefill_budget(len(plan.decodes)))
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is Status.RUNNING and seq.is_prefilling:
                n = min(seq.num_remaining, self.config.prefill_chunk, budget)
                if self._make_room(seq, n, plan):
                    plan.prefills.append((seq, n))
                    budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting[0]
            if seq.num_pending:  # preempted with a draw still on the device: its ids come first
                break
            n = self.blocks.admit(seq, min(self.config.prefill_chunk, budget))
            if not n:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.prefills.append((seq, n))
            budget -= n
        return plan

    def step_done(self, plan: StepPlan) -> None:
        """`plan`'s draws are back. The time since the previous step's came back is this step's
        whole cost (model, sampling, streaming) as long as the engine stepped straight on, which it
        does while anything runs; with async scheduling the device ran this step in that time while
        the host built the next, so the time still belongs to this plan."""
        now = self._clock()
        if self.pacer is not None and self._last_done is not None:
            self.pacer.observe(now - self._last_done, len(plan.decodes), sum(n for _, n in plan.prefills))
        self._last_done = now if self.running else None

    def prefill_budget(self, decodes: int) -> int:
        """Prompt tokens this step may prefill next to `decodes` decodes (before the token budget)."""
        cfg = self.config
        if not decodes:
            return cfg.max_num_batched_tokens
        budget = cfg.max_prefill_tokens_per_step or cfg.max_num_batched_tokens
        if self.pacer is not None:
            budget = min(budget, self.pacer.limit)
        return budget

    def advance(self, plan: StepPlan) -> None:
        """Count the positions a built step computes: the next plan starts after them. (When the
        blocks they fill are published as cached prefixes: `LLMEngine`.)"""
        for seq, n in plan.decodes + plan.prefills:
            seq.num_computed += n

    def rollback(self, seq: Sequence, n: int) -> None:
        """Uncount the last `n` positions `seq` computed (drafted tokens the step rejected) and
        give back the blocks only they were in."""
        seq.num_computed -= n
        self.blocks.shrink(seq)

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq)
        else:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def _make_room(self, seq: Sequence, n: int, plan: StepPlan) -> bool:
        """Grow `seq` by `n` tokens, preempting the newest running sequences until it fits;
        False if `seq` itself had to go."""
        while not self.blocks.grow(seq, n):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
        plan.decodes = [(s, n) for s, n in plan.decodes if s is not seq]
        plan.prefills = [(s, n) for s, n in plan.prefills if s is not seq]
