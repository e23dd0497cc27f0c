"""The bounded prefill budget: prompts advance oldest first, and a step time target paces them."""

from __future__ import annotations

import pytest
from support.platforms import pretend

from server.engine.args import EngineArgs
from server.engine.core.block_manager import BlockManager
from server.engine.core.scheduler import PrefillPacer, Scheduler
from server.engine.core.sequence import Sequence, Status
from server.engine.factory import with_device_defaults
from server.engine.types import SamplingParams


def seq(rid: str, n: int, max_tokens: int = 4) -> Sequence:
    return Sequence(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens), emit=lambda item: None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def step(s: Scheduler, plan_seconds: float = 0.0, clock: Clock | None = None) -> tuple[list, list]:
    plan = s.schedule()
    s.advance(plan)
    for q in [q for q, _ in plan.decodes] + [q for q, n in plan.prefills if q.num_computed == len(q)]:
        q.append(7)
    if clock is not None:
        clock.now += plan_seconds
    s.step_done(plan)
    return [q for q, _ in plan.decodes], [(q.request_id, n) for q, n in plan.prefills]


def test_while_decoding_only_the_oldest_prompt_takes_the_prefill_budget():
    args = EngineArgs(max_num_seqs=8, max_num_batched_tokens=64, prefill_chunk_size=16, max_prefill_tokens_per_step=16)
    s = Scheduler(args, BlockManager(64, 4))
    s.add(seq("d", 3, max_tokens=20))
    step(s)  # d prefilled, now decoding
    for i in range(3):
        s.add(seq(f"p{i}", 40))
    decodes, prefills = step(s)
    assert [q.request_id for q in decodes] == ["d"] and prefills == [("p0", 16)]
    _, prefills = step(s)
    assert prefills == [("p0", 16)]  # p0 continues before p1 is admitted
    _, prefills = step(s)
    assert prefills == [("p0", 8), ("p1", 8)]  # p0's last chunk, then p1 fills the rest
    assert [q.request_id for q in s.waiting] == ["p2"]


def test_nothing_to_decode_prefills_up_to_the_token_budget():
    args = EngineArgs(max_num_seqs=8, max_num_batched_tokens=48, prefill_chunk_size=16, max_prefill_tokens_per_step=16)
    s = Scheduler(args, BlockManager(64, 4))
    for i in range(4):
        s.add(seq(f"p{i}", 40))
    _, prefills = step(s)
    assert prefills == [("p0", 16), ("p1", 16), ("p2", 16)]


def test_a_slow_step_shrinks_the_prefill_budget_to_the_target_and_a_fast_one_grows_it():
    clock = Clock()
    args = EngineArgs(
        max_num_seqs=8,
        max_num_batched_tokens=256,
        prefill_chunk_size=128,
        max_prefill_tokens_per_step=128,
        target_step_ms=30.0,
    )
    s = Scheduler(args, BlockManager(256, 4), clock=clock)
    s.add(seq("d", 3, max_tokens=50))
    step(s, 0.01, clock)
    s.add(seq("p", 900))
    _, prefills = step(s, 0.12, clock)  # 128 prompt tokens next to a decode: 120 ms
    assert prefills == [("p", 128)]
    _, prefills = step(s, 0.03, clock)
    assert prefills == [("p", 64)]  # halved at most per step
    assert s.pacer is not None and s.pacer.limit == 64
    _, prefills = step(s, 0.015, clock)
    assert prefills == [("p", 64)]
    _, prefills = step(s, 0.03, clock)
    assert prefills == [("p", 128)]  # doubled at most, capped by max_prefill_tokens_per_step
    assert all(q.status is Status.RUNNING for q in s.running)


def test_the_pacer_never_goes_below_one_block():
    p = PrefillPacer(target_s=0.01, floor=64, ceiling=512)
    for _ in range(10):
        p.observe(1.0, decodes=64, prefill_tokens=p.limit)
    assert p.limit == 64
    p.observe(0.001, decodes=0, prefill_tokens=64)  # a step with no decode teaches nothing
    assert p.limit == 64


@pytest.mark.parametrize("backend, resolved", [("cpu", (16, 512)), ("metal", (64, 512)), ("cuda", (64, 2048))])
def test_device_defaults_resolve_only_what_is_unset(monkeypatch, backend, resolved):
    pretend(monkeypatch, backend)
    args = with_device_defaults(EngineArgs())
    assert (args.max_num_seqs, args.prefill_chunk_size) == resolved
    kept = with_device_defaults(EngineArgs(max_num_seqs=3, prefill_chunk_size=100))
    assert (kept.max_num_seqs, kept.prefill_chunk_size) == (3, 100)
    s = Scheduler(EngineArgs(max_num_seqs=2), BlockManager(8, 4))  # a chunk size nobody resolved
    s.add(seq("a", 2))
    with pytest.raises(ValueError, match="resolved"):
        s.schedule()
