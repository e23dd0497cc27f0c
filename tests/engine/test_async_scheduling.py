"""Async scheduling (LLMEngine.step): each step is built before the previous one's draws are read
back, and that changes no output. Every test compares the engine with it on and off, or
checks what the overlap must not do: run a finished sequence on, leak a block, or mask a
constrained output with a grammar that has not seen the last token."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest
from support.engine_harness import ScriptedRunner, make_engine, prompt, run_until_idle, submit

from server.engine.types import EngineError, OutputConstraint, SamplingParams

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

EOS = 2  # the demo model's </s>

REQUESTS = [  # (request id, prompt, sampling params)
    ("greedy", prompt(70, seed=1), {"max_tokens": 24, "ignore_eos": True}),
    ("short", prompt(5, seed=2), {"max_tokens": 1}),
    ("shared", prompt(70, seed=1)[:64] + prompt(9, seed=3), {"max_tokens": 12, "ignore_eos": True}),
    ("seeded", prompt(40, seed=4), {"max_tokens": 20, "temperature": 1.0, "seed": 7, "ignore_eos": True}),
    (
        "penalized",
        prompt(33, seed=5),
        {"max_tokens": 20, "temperature": 0.8, "seed": 3, "frequency_penalty": 1.5, "repetition_penalty": 1.3},
    ),
    ("logprobs", prompt(20, seed=6), {"max_tokens": 8, "logprobs": True, "top_logprobs": 3}),
    ("eos", prompt(12, seed=7), {"max_tokens": 40}),
]


def outputs(mode: str, **engine_args):
    engine = make_engine(async_scheduling=mode, **engine_args)
    runs = {}
    for i, (rid, ids, params) in enumerate(REQUESTS):
        runs[rid] = submit(engine, rid, ids, **params)
        if i % 2:  # arrivals between steps, beside running decodes
            engine.step()
    run_until_idle(engine)
    assert engine.blocks.num_free == len(engine.blocks.blocks)
    summary = {
        rid: (c.token_ids, c.finish_reason, c.deltas[-1].cached_tokens, [d.logprobs for d in c.deltas])
        for rid, c in runs.items()
    }
    return summary, engine.counters


def test_the_same_tokens_logprobs_and_cache_hits_with_and_without_async_scheduling():
    on, counters_on = outputs("on")
    off, counters_off = outputs("off")
    assert on == off
    assert on["shared"][2] == 64  # the second request reused the first's full block
    assert counters_on["generated_tokens"] == counters_off["generated_tokens"]


def test_the_same_tokens_when_a_small_pool_preempts():
    small = {"num_blocks": 4, "max_model_len": 256, "prefill_chunk_size": 32, "max_num_batched_tokens": 64}
    on, counters_on = outputs("on", **small)
    off, counters_off = outputs("off", **small)
    assert counters_on["preemptions"] > 0 and counters_off["preemptions"] > 0
    assert on == off


def test_steps_are_built_ahead_of_read_backs():
    order: list[str] = []

    class Recording(ScriptedRunner):
        def run(self, plan):
            order.append("run")
            return super().run(plan)

    for mode, expected in (
        ("off", ["run", "emit"] * 3),
        ("on", ["run", "run", "emit", "run", "emit", "emit"]),  # step k's draw streams once step k+1 is built
    ):
        order.clear()
        engine = make_engine(runner=Recording(), async_scheduling=mode)
        params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0)
        engine.add_request(prompt(8), params, emit=lambda item: order.append("emit"))
        run_until_idle(engine)
        assert order == expected, mode


def test_a_sequence_ended_by_a_draw_still_pending_streams_nothing_more_and_frees_its_blocks():
    script = {"a": [40, 41, EOS, 43, 44], "b": [50] * 30}
    engine = make_engine(runner=ScriptedRunner(script), async_scheduling="on")
    a = submit(engine, "a", prompt(10), max_tokens=20)
    b = submit(engine, "b", prompt(10, seed=1), max_tokens=30, ignore_eos=True)
    run_until_idle(engine)
    assert a.token_ids == [40, 41, EOS] and a.finish_reason == "stop"  # step 4 ran it in vain; dropped
    assert b.token_ids == [50] * 30 and b.finish_reason == "length"
    assert engine.counters["generated_tokens"] == 33
    assert engine.blocks.num_free == len(engine.blocks.blocks)


def test_a_sequence_that_has_drawn_its_last_token_is_not_run_again():
    # Two blocks: "a" (63 prompt tokens, 2 outputs) fits block 0; "b" holds block 1. Running "a"
    # once more with its last draw pending would put that draw at position 64, in a third block
    # the pool does not have: "b" would be preempted for a token nobody reads.
    engine = make_engine(num_blocks=2, runner=ScriptedRunner(), async_scheduling="on")
    a = submit(engine, "a", prompt(63), max_tokens=2, ignore_eos=True)
    b = submit(engine, "b", prompt(10, seed=1), max_tokens=20, ignore_eos=True)
    run_until_idle(engine)
    assert a.token_ids == [100] * 2 and b.token_ids == [100] * 20
    assert engine.counters["preemptions"] == 0


def test_an_abort_while_a_step_is_in_flight_streams_nothing_after_it():
    engine = make_engine(runner=ScriptedRunner(), async_scheduling="on")
    out = submit(engine, "r", prompt(8), max_tokens=50, ignore_eos=True)
    keep = submit(engine, "k", prompt(8, seed=2), max_tokens=10, ignore_eos=True)
    for _ in range(5):
        engine.step()
    engine.abort("r")
    seen = len(out.token_ids)
    run_until_idle(engine)
    assert len(out.token_ids) == seen and out.finish_reason is None
    assert len(keep.token_ids) == 10
    assert engine.blocks.num_free == len(engine.blocks.blocks)


def test_constrained_outputs_are_the_same_and_valid_with_async_scheduling():
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    texts = {}
    for mode in ("on", "off"):
        engine = make_engine(async_scheduling=mode)
        runs = [
            submit(
                engine,
                f"j{i}",
                prompt(20, seed=i),
                temperature=1.0,
                seed=i,
                max_tokens=60,
                constraint=OutputConstraint(json_schema=schema),
            )
            for i in range(4)
        ]
        plain = submit(engine, "plain", prompt(20, seed=9), max_tokens=30, ignore_eos=True)
        run_until_idle(engine)
        texts[mode] = [r.text for r in runs] + [plain.text]
        for r in runs:
            jsonschema.validate(json.loads(r.text), schema)
    assert texts["on"] == texts["off"]


def test_after_a_failed_step_no_prefix_registered_when_it_was_built_is_reused():
    engine = make_engine(runner=ScriptedRunner(), async_scheduling="on")
    ids = prompt(130)
    failed = submit(engine, "a", ids, max_tokens=4, ignore_eos=True)
    engine.step()  # queued: its two full blocks are registered before the device has run it
    assert engine.blocks.cached
    engine.fail_all(EngineError("internal engine error: RuntimeError"))  # as AsyncEngine on a failed step
    assert failed.error is not None and not engine.blocks.cached
    again = submit(engine, "b", ids, max_tokens=1)
    run_until_idle(engine)
    assert again.deltas[-1].cached_tokens == 0
    assert engine.blocks.num_free == len(engine.blocks.blocks)


def test_the_step_time_target_still_paces_prefills_with_async_scheduling():
    prefilled = []  # prompt tokens of each step that also decodes

    class Slow(ScriptedRunner):  # every step takes at least 20 ms, four times the target
        def run(self, plan):
            time.sleep(0.02)
            if plan.decodes:
                prefilled.append(sum(n for _, n in plan.prefills))
            return super().run(plan)

    engine = make_engine(runner=Slow(), async_scheduling="on", target_step_ms=5.0, max_prefill_tokens_per_step=512)
    submit(engine, "d", prompt(8), max_tokens=40, ignore_eos=True)
    engine.step()
    submit(engine, "p", prompt(2000, seed=1), max_tokens=1)
    run_until_idle(engine)
    assert prefilled[1] == 512 and 64 in prefilled  # halved step by step down to one block
