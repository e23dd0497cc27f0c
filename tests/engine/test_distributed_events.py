"""distributed.py's own rules, in one process: what rank 0's events look like on the wire, and
the seed every rank must share (the launched two-rank runs are tests/engine/test_distributed.py)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from server.engine.distributed import AddRequest, EventChannel, shard_model, with_fixed_seed
from server.engine.types import OutputConstraint, SamplingParams, ToolSpec


def test_an_unseeded_request_gets_a_seed_and_a_seeded_one_keeps_its_own():
    fixed = with_fixed_seed(SamplingParams(temperature=0.7))
    assert fixed.seed is not None and fixed.temperature == 0.7
    assert with_fixed_seed(SamplingParams(seed=5)).seed == 5
    assert len({with_fixed_seed(SamplingParams()).seed for _ in range(8)}) == 8  # not one shared seed


def test_rank_0_s_events_come_back_whole_through_the_channel():
    group = mx.distributed.init()  # without a launcher: this process alone, rank 0 of 1
    params = SamplingParams(
        max_tokens=9,
        stop=["\n\n"],
        seed=3,
        constraint=OutputConstraint(tools=(ToolSpec("f", {"type": "object"}),), tool_choice="required"),
    )
    events = [("add", AddRequest("r1", [1, 2, 3], params)), ("abort", "r0"), ("expire", "r2"), ("stop", None)]
    assert EventChannel(group).exchange(events) == events
    assert EventChannel(group).exchange([]) == []


def test_a_model_without_shard_is_refused_by_name():
    class Unshardable:
        pass

    with pytest.raises(ValueError, match="cannot be sharded"):
        shard_model(Unshardable(), mx.distributed.init())
