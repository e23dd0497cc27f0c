"""Which sequences run in the next step, and how many tokens of each.

Each step has a token budget. Decoding sequences go first, one token each, so running streams keep
flowing; then prefills continue in chunks, oldest first; then waiting requests are admitted while
blocks and slots last. When a running sequence cannot grow, the newest running one is preempted:
its blocks go back (its full blocks stay cached) and it is recomputed later.

The result is a `StepPlan` of plain data, so that several ranks can apply the same decisions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .args import EngineArgs
from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class StepPlan:
    # (sequence, number of tokens to run): decodes (one token) first, then prefill chunks.
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)


class Scheduler:
    def __init__(self, config: EngineArgs, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if seq.status is Status.RUNNING and not seq.is_prefilling and self._make_room(seq, 1, plan):
                plan.decodes.append(seq)
                budget -= 1
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is Status.RUNNING and seq.is_prefilling:
                n = min(seq.num_remaining, self.config.prefill_chunk_size, budget)
                if self._make_room(seq, n, plan):
                    plan.prefills.append((seq, n))
                    budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = self.blocks.admit(seq, min(self.config.prefill_chunk_size, budget))
            if not n:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.prefills.append((seq, n))
            budget -= n
        return plan

    def advance(self, plan: StepPlan) -> None:
        """Count the tokens the step computed and register the blocks they filled."""
        for seq, n in [(s, 1) for s in plan.decodes] + plan.prefills:
            old = seq.num_computed
            seq.num_computed += n
            self.blocks.commit(seq, old)

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
        if seq in plan.decodes:
            plan.decodes.remove(seq)
        plan.prefills = [(s, n) for s, n in plan.prefills if s is not seq]
