"""The scheduler's policy, as properties that hold over many random workloads.

Pure Python (no model): a step is `schedule()`, `advance()`, then one new token for every
sequence the step sampled, as the engine does. Checked at every step:

- no step runs more tokens than its budget (`max_num_batched_tokens`);
- never more than `max_num_seqs` sequences are running;
- a running sequence with exactly one token left (its last sampled token) is a decode, not a prefill;
- when a sequence must be preempted, it is the newest running one (last admitted), newest first;
- and every request still ends, with every block back in the pool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from server.engine.args import EngineArgs
from server.engine.core.block_manager import BlockManager
from server.engine.core.scheduler import Scheduler, StepPlan
from server.engine.core.sequence import Sequence, Status
from server.engine.types import SamplingParams


def make_seq(request_id: str, prompt: list[int], max_tokens: int) -> Sequence:
    return Sequence(request_id, prompt, SamplingParams(max_tokens=max_tokens), emit=lambda item: None)


@dataclass
class Sim:
    """A scheduler and block manager driven step by step, with the engine's bookkeeping."""

    args: EngineArgs
    num_blocks: int
    block_size: int = 4
    steps: list[StepPlan] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # in order of (last) admission

    def __post_init__(self) -> None:
        self.blocks = BlockManager(self.num_blocks, self.block_size, self.args.enable_prefix_caching)
        self.scheduler = Scheduler(self.args, self.blocks)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def step(self) -> StepPlan:
        running_before = list(self.scheduler.running)
        plan = self.scheduler.schedule()
        self.check(plan, running_before)
        sampled = plan.samples
        self.scheduler.advance(plan)
        for seq, _ in sampled:
            seq.append(7 + len(seq) % 5)
            if len(seq.output_ids) >= (seq.params.max_tokens or 0):
                self.scheduler.finish(seq)
        self.steps.append(plan)
        return plan

    def check(self, plan: StepPlan, running_before: list[Sequence]) -> None:
        budget, max_seqs = self.args.max_num_batched_tokens, self.args.max_num_seqs
        assert plan.num_tokens <= budget, f"step runs {plan.num_tokens} tokens, budget {budget}"
        assert len(self.scheduler.running) <= max_seqs
        assert len(plan.decodes) + len(plan.prefills) <= max_seqs
        assert all(n > 0 for _, n in plan.prefills)
        # Preemption takes the newest running sequences first.
        if plan.preempted:
            k = len(plan.preempted)
            assert plan.preempted == running_before[::-1][:k], "not the newest running sequence was preempted"
        # A sequence that was already running and has one token left decodes it.
        kept = [s for s in running_before if s not in plan.preempted]
        prefilled = {id(s) for s, _ in plan.prefills}
        for seq in kept:
            if seq.num_remaining == 1:
                assert (seq, 1) in plan.decodes and id(seq) not in prefilled, (
                    "a one-token sequence planned as a prefill"
                )

    def run(self, max_steps: int = 20_000) -> None:
        while self.scheduler.has_work:
            self.step()
            assert len(self.steps) < max_steps, "the scheduler stopped making progress"


def random_workload(rng: random.Random) -> tuple[EngineArgs, int, list[tuple[int, Sequence]]]:
    max_num_seqs = rng.randint(1, 6)
    args = EngineArgs(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=rng.randint(max_num_seqs, 48),
        prefill_chunk_size=rng.randint(1, 24),
        block_size=4,
        enable_prefix_caching=rng.random() < 0.7,
    )
    num_blocks = rng.randint(6, 24)
    capacity = num_blocks * 4
    arrivals = []
    for i in range(rng.randint(1, 12)):
        prompt_len = rng.randint(1, min(40, capacity - 2))
        max_tokens = rng.randint(1, min(12, capacity - prompt_len))
        shared = rng.choice([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]])
        prompt = (shared + [rng.randint(10, 99) for _ in range(prompt_len)])[:prompt_len]
        arrivals.append((rng.randint(0, 10), make_seq(f"r{i}", prompt, max_tokens)))
    return args, num_blocks, arrivals


@pytest.mark.parametrize("seed", range(300))
def test_policy_holds_at_every_step_of_random_workloads(seed):
    rng = random.Random(seed)
    args, num_blocks, arrivals = random_workload(rng)
    sim = Sim(args, num_blocks)
    step = 0
    pending = sorted(arrivals, key=lambda a: a[0])
    while pending or sim.scheduler.has_work:
        while pending and pending[0][0] <= step:
            sim.add(pending.pop(0)[1])
        if sim.scheduler.has_work:
            sim.step()
        step += 1
        assert step < 20_000
    assert all(s.status is Status.FINISHED for _, s in arrivals)
    assert all(len(s.output_ids) == s.params.max_tokens for _, s in arrivals)
    assert sim.blocks.num_free == num_blocks


def test_admissions_share_the_step_budget():
    """Three long prompts, a budget of 16 and chunks of 8: the first step admits two, not three."""
    sim = Sim(EngineArgs(max_num_seqs=4, max_num_batched_tokens=16, prefill_chunk_size=8, block_size=4), 64)
    for i in range(3):
        sim.add(make_seq(f"p{i}", list(range(10 + 40 * i, 50 + 40 * i)), 2))
    plan = sim.step()
    assert [n for _, n in plan.prefills] == [8, 8]
    assert plan.num_tokens == 16


def test_never_more_running_than_max_num_seqs():
    sim = Sim(EngineArgs(max_num_seqs=2, max_num_batched_tokens=64, prefill_chunk_size=8, block_size=4), 64)
    for i in range(5):
        sim.add(make_seq(f"s{i}", [10 + i, 11, 12], 3))
    plan = sim.step()
    assert len(plan.prefills) == 2 and len(sim.scheduler.running) == 2 and len(sim.scheduler.waiting) == 3
    sim.run()


def test_the_newest_running_sequence_is_preempted():
    """Three decoding sequences outgrow a pool of 6 blocks: the last admitted goes back to waiting
    (first in line), the older ones keep growing."""
    sim = Sim(EngineArgs(max_num_seqs=4, max_num_batched_tokens=64, prefill_chunk_size=64, block_size=4), 6)
    seqs = [make_seq(f"s{i}", [10 + i] * 3 + [i], 12) for i in range(3)]
    for s in seqs:
        sim.add(s)
    sim.step()  # admits all three: one block each
    assert sim.scheduler.running == seqs
    preempted = []
    while not preempted:
        preempted = sim.step().preempted
    assert preempted == [seqs[2]]
    assert sim.scheduler.waiting[0] is seqs[2] and seqs[2].status is Status.WAITING
    assert sim.scheduler.running == seqs[:2]
    sim.run()
    assert all(len(s.output_ids) == 12 for s in seqs)


def test_one_token_left_is_a_decode():
    """A 9-token prompt in chunks of 8 leaves one prompt token: the next step decodes it (and
    samples), as every later step does with the sampled token."""
    sim = Sim(EngineArgs(max_num_seqs=2, max_num_batched_tokens=32, prefill_chunk_size=8, block_size=4), 16)
    seq = make_seq("s", list(range(20, 29)), 3)
    sim.add(seq)
    first = sim.step()
    assert first.prefills == [(seq, 8)] and not seq.output_ids
    for _ in range(3):
        plan = sim.step()
        assert plan.decodes == [(seq, 1)] and plan.prefills == []
    assert seq.status is Status.FINISHED and len(seq.output_ids) == 3


def test_a_step_spends_its_whole_budget_when_there_is_work():
    """Decodes cost one token each and the rest of the budget goes to prefill: two decoding
    sequences and a long prompt waiting, with a budget of 16, make a 14-token prefill chunk."""
    sim = Sim(EngineArgs(max_num_seqs=4, max_num_batched_tokens=16, prefill_chunk_size=16, block_size=4), 64)
    for i in range(2):
        sim.add(make_seq(f"d{i}", [10 + i, 11, 12], 20))
    sim.step()
    long = make_seq("long", list(range(100, 160)), 2)
    sim.add(long)
    plan = sim.step()
    assert len(plan.decodes) == 2 and plan.prefills == [(long, 14)] and plan.num_tokens == 16


def test_a_preempted_sequence_waits_for_its_pending_draw_before_it_is_admitted_again():
    # Its next prefill would read the draw's id, which only the engine's read-back supplies.
    sim = Sim(EngineArgs(max_num_seqs=4, max_num_batched_tokens=64, prefill_chunk_size=64), num_blocks=8)
    seq = make_seq("p", list(range(10, 30)), max_tokens=8)
    seq.num_pending = 1  # as a sequence preempted while a launched step drew for it
    sim.add(seq)
    assert sim.scheduler.schedule().empty and seq.status is Status.WAITING
    seq.num_pending = 0
    seq.append(99)  # read back
    plan = sim.scheduler.schedule()
    assert plan.prefills == [(seq, 21)]
