"""Speculation on the demo model: greedy outputs equal decoding without it, in a mixed batch with
chunked prefill, preemption and cancellation; constrained outputs still validate."""

from __future__ import annotations

import json

import jsonschema
from support.engine_harness import make_engine, prompt, run_until_idle, submit
from support.hardware import needs_reference_decode

from server.engine.types import OutputConstraint


def repetitive(n: int, seed: int) -> list[int]:
    """A prompt that says its first half twice, so prompt lookup finds drafts in it."""
    half = prompt(n // 2, seed=seed)
    return half + half


def run_batch(speculative: str, **args) -> tuple[list[list[int]], dict]:
    """A mixed batch: prompts long enough to be chunked, arriving while others decode, one of
    them cancelled midway."""
    engine = make_engine(
        speculative=speculative, prefill_chunk_size=64, max_num_batched_tokens=160, async_scheduling="on", **args
    )
    outs = [submit(engine, f"r{i}", repetitive(90 + 40 * i, seed=i), max_tokens=50, ignore_eos=True) for i in range(2)]
    cancelled = submit(engine, "gone", repetitive(80, seed=7), max_tokens=50, ignore_eos=True)
    for _ in range(8):
        engine.step()
    outs += [submit(engine, f"late{i}", repetitive(150, seed=10 + i), max_tokens=40, ignore_eos=True) for i in range(2)]
    for _ in range(6):
        engine.step()
    engine.abort("gone")
    run_until_idle(engine)
    assert len(cancelled.token_ids) < 50
    assert engine.blocks.num_free == len(engine.blocks.blocks)
    return [o.token_ids for o in outs], engine.stats()


@needs_reference_decode
def test_greedy_outputs_equal_without_speculation_in_a_mixed_batch():
    off, _ = run_batch("off")
    on, stats = run_batch("ngram")
    assert on == off
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_drafts"] > 0
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"]  # some drafts were rolled back


@needs_reference_decode
def test_greedy_outputs_equal_without_speculation_under_preemption():
    # 3 x 170 tokens need 9 blocks: 7 force the newest sequence out while the others grow.
    off, off_stats = run_batch("off", num_blocks=7, max_model_len=448)
    on, stats = run_batch("ngram", num_blocks=7, max_model_len=448)
    assert off_stats["preemptions"] > 0 and stats["preemptions"] > 0
    assert on == off
    assert stats["spec_accepted_tokens"] > 0


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
    "required": ["name", "n"],
    "additionalProperties": False,
}


def test_constrained_outputs_validate_next_to_speculating_sequences():
    engine = make_engine(speculative="ngram", async_scheduling="on")
    plain = [submit(engine, f"p{i}", repetitive(80, seed=i), max_tokens=40, ignore_eos=True) for i in range(2)]
    constrained = [
        submit(
            engine,
            f"j{i}",
            repetitive(40, seed=5 + i),
            temperature=1.0,
            seed=i,
            max_tokens=60,
            constraint=OutputConstraint(json_schema=SCHEMA),
        )
        for i in range(2)
    ]
    run_until_idle(engine)
    for c in constrained:
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert all(len(p.token_ids) == 40 for p in plain)
    assert engine.stats()["spec_drafts"] > 0
