"""A step's draws handed to their sequences (`LLMEngine._append`), several tokens per sequence at
once as a step that verifies drafted tokens will hand them: each goes through the ending rules in
order, and the first that ends the output ends it."""

from __future__ import annotations

import mlx.core as mx
from support.engine_harness import ScriptedRunner, make_engine, prompt, submit

from server.engine.core.sequence import Status
from server.engine.sample.sampling import SampleResult

EOS = 2  # the demo model's </s>


def decoding(**params):
    """An engine with one sequence per entry of `params`, each prefilled (its first token, 100,
    read back) and decoding."""
    engine = make_engine(runner=ScriptedRunner(), async_scheduling="off")
    outs = [submit(engine, f"r{i}", prompt(10, seed=i), **p) for i, p in enumerate(params.values())]
    engine.step()
    return engine, [engine.by_id[f"r{i}"] for i in range(len(outs))], outs


def hand(engine, seqs, tokens: list[list[int]]) -> None:
    """Read back a step that drew `tokens[i]` for `seqs[i]` (verifying no draft: every draw kept)."""
    for seq, drawn in zip(seqs, tokens, strict=True):
        seq.num_pending += len(drawn)  # as the step that drew them counted them
    flat = [t for drawn in tokens for t in drawn]
    engine._append(seqs, SampleResult(mx.array(flat, mx.int32), mx.zeros((len(flat),)), [len(d) for d in tokens]), {})


def test_every_token_handed_is_appended_and_streamed_in_order():
    engine, (a, b), (out_a, out_b) = decoding(a={"max_tokens": 20}, b={"max_tokens": 20})
    hand(engine, [a, b], [[40, 41, 42], [50]])
    assert out_a.token_ids == [100, 40, 41, 42] and [d.completion_tokens for d in out_a.deltas] == [1, 2, 3, 4]
    assert out_b.token_ids == [100, 50]
    assert a.num_pending == b.num_pending == 0 and a.status is b.status is Status.RUNNING
    assert engine.counters["generated_tokens"] == 6


def test_the_first_token_that_ends_the_output_ends_it_there():
    engine, (a, b, c), (out_a, out_b, out_c) = decoding(
        a={"max_tokens": 20}, b={"max_tokens": 3}, c={"max_tokens": 20, "ignore_eos": True}
    )
    hand(engine, [a, b, c], [[40, EOS, 42], [50, 51, 52], [60, EOS, 62]])
    assert out_a.token_ids == [100, 40, EOS] and out_a.finish_reason == "stop"
    assert out_b.token_ids == [100, 50, 51] and out_b.finish_reason == "length"
    assert out_c.token_ids == [100, 60, EOS, 62] and out_c.finish_reason is None
    assert a.status is b.status is Status.FINISHED and a.output_ids == [100, 40, EOS]
    assert a.num_pending == b.num_pending == 0
    assert engine.counters["generated_tokens"] == 3 + 3 + 4
    engine.abort("r2")
    assert engine.blocks.num_free == len(engine.blocks.blocks)
