"""Serving behaviours of the engine: block accounting, prefix reuse, chunked prefill fairness,
seeded sampling inside different batches, stop strings, UTF-8 streaming, time-outs."""

import random

import pytest
from support.engine_harness import ScriptedRunner, demo_model, make_engine, prompt, run_until_idle, submit
from support.hardware import needs_reference_decode

from server.engine.async_engine import apply_events

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset


def test_no_block_leaks_after_random_requests_cancellations_and_preemptions():
    rng = random.Random(0)
    engine = make_engine(
        num_blocks=8,
        runner=ScriptedRunner(),
        max_model_len=256,
        max_num_seqs=6,
        max_num_batched_tokens=128,
        prefill_chunk_size=64,
    )
    live = {}
    for i in range(1000):
        # Shared prefixes (5 seeds) exercise prefix hits; a few long outputs force preemptions.
        p = prompt(rng.randint(1, 100), seed=rng.randint(0, 4))
        n = rng.randint(60, 120) if rng.random() < 0.1 else rng.randint(1, 4)
        live[f"r{i}"] = submit(engine, f"r{i}", p, max_tokens=n, ignore_eos=True, temperature=rng.choice([0.0, 1.0]))
        if rng.random() < 0.3:
            engine.abort(rng.choice(list(live)))
        if rng.random() < 0.5:
            engine.step()
    run_until_idle(engine)
    assert engine.counters["preemptions"] > 0
    assert engine.blocks.num_free == len(engine.blocks.blocks)
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)
    assert not engine.by_id and not engine.scheduler.running and not engine.scheduler.waiting


def test_second_turn_prefills_only_the_new_tokens():
    _, tok = demo_model()
    engine = make_engine(prefill_chunk_size=512)
    history = [{"role": "user", "content": "Tell me a story about a small model. " * 20}]
    first_ids = tok.apply_chat_template(history, add_generation_prompt=True)
    first = submit(engine, "turn1", first_ids, max_tokens=40, ignore_eos=True)
    run_until_idle(engine)

    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    second_ids = tok.apply_chat_template(history, add_generation_prompt=True)
    assert second_ids[: len(first_ids)] == first_ids
    computed = []
    original = engine.runner.run
    engine.runner.run = lambda plan: computed.extend(n for _, n in plan.prefills) or original(plan)
    second = submit(engine, "turn2", second_ids, max_tokens=1)
    run_until_idle(engine)

    # Reused: every full block of what the first turn cached (prompt and the outputs that went
    # back through the model) that the second prompt repeats token for token.
    cached_first = first_ids + first.token_ids[:-1]
    common = next(
        (i for i, (a, b) in enumerate(zip(cached_first, second_ids, strict=False)) if a != b), len(cached_first)
    )
    cached = second.deltas[-1].cached_tokens
    assert cached == min(common, len(second_ids) - 1) // 64 * 64
    assert cached >= len(first_ids) // 64 * 64
    assert sum(computed) == len(second_ids) - cached


def test_long_prompt_does_not_stall_running_streams():
    engine = make_engine(num_blocks=128, prefill_chunk_size=256, max_num_batched_tokens=264)
    streams = [submit(engine, f"s{i}", prompt(20, seed=i), max_tokens=200, ignore_eos=True) for i in range(8)]
    for _ in range(3):
        engine.step()
    long = submit(engine, "long", prompt(3000, seed=99), max_tokens=1)
    decoded_during_prefill = 0
    while not long.deltas:
        before = sum(len(s.deltas) for s in streams)
        engine.step()
        decoded_during_prefill += sum(len(s.deltas) for s in streams) - before
    # 3000 tokens in chunks of <= 256: at least 12 steps, each of which also decoded all 8 streams.
    assert decoded_during_prefill >= 8 * 11
    for i in range(8):
        engine.abort(f"s{i}")
    assert engine.blocks.num_free == len(engine.blocks.blocks)


@needs_reference_decode
def test_seeded_sampling_is_the_same_in_any_batch():
    ids = prompt(40, seed=3)
    alone = make_engine()
    a = submit(alone, "x", ids, max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    run_until_idle(alone)

    crowded = make_engine()
    for i in range(5):
        submit(crowded, f"n{i}", prompt(30 + i, seed=i), max_tokens=20, temperature=1.0, ignore_eos=True)
    crowded.step()
    b = submit(crowded, "x", ids, max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    run_until_idle(crowded)
    assert a.token_ids == b.token_ids


def test_stop_string_across_token_boundaries_is_never_streamed():
    _, tok = demo_model()
    engine = make_engine()
    ids = prompt(30, seed=5)
    free = submit(engine, "free", ids, max_tokens=30, ignore_eos=True)
    run_until_idle(engine)
    text = free.text
    # A stop string that spans two generated tokens: the end of one and the start of the next.
    pieces = [tok.decode([t]) for t in free.token_ids]
    cut = next(i for i in range(5, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
    stop = pieces[cut][-1] + pieces[cut + 1][:1]
    start = text.index(stop)

    stopped = submit(engine, "stopped", ids, max_tokens=30, stop=[stop], ignore_eos=True)
    run_until_idle(engine)
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[:start]
    assert all(stop not in d.text for d in stopped.deltas)


def test_utf8_streams_never_split_a_character():
    _, tok = demo_model()
    text = "😀 🚀 日本語のテキスト 你好，世界 안녕하세요 café ✨"
    ids = tok.encode(text)
    engine = make_engine(runner=ScriptedRunner({"u": ids}))
    out = submit(engine, "u", prompt(5), max_tokens=len(ids), ignore_eos=True)
    run_until_idle(engine)
    assert out.token_ids == ids
    assert len(out.deltas) == len(ids) and any(d.text == "" for d in out.deltas)
    assert all("\ufffd" not in d.text for d in out.deltas)
    assert out.text == text


def test_timed_out_request_frees_its_blocks():
    engine = make_engine()
    out = submit(engine, "slow", prompt(50), max_tokens=500, ignore_eos=True)
    engine.step()
    apply_events(engine, [("expire", "slow")], {})  # what the engine thread sends at the deadline
    engine.step()
    assert out.error is not None and "timed out" in str(out.error)
    assert engine.blocks.num_free == len(engine.blocks.blocks)


def test_prefills_that_outgrow_the_pool_preempt_instead_of_stalling():
    # Two 300-token prompts in 64-token chunks, and room for only one of them at a time.
    engine = make_engine(num_blocks=6, runner=ScriptedRunner(), prefill_chunk_size=64, max_num_batched_tokens=128)
    outs = [submit(engine, f"p{i}", prompt(300, seed=i), max_tokens=4, ignore_eos=True) for i in range(2)]
    run_until_idle(engine, max_steps=200)
    assert [o.finish_reason for o in outs] == ["length", "length"]
    assert engine.counters["preemptions"] > 0
    assert engine.blocks.num_free == 6


def test_on_the_cpu_sixteen_sequences_run_at_once_unless_told_otherwise():
    """The CPU's decode throughput grows little past 16 sequences (docs/serving.md): by default
    the 17th request waits instead of stretching every stream's inter-token latency."""
    engine = make_engine(num_blocks=64)  # through load_engine, max_num_seqs unset
    assert engine.args.max_num_seqs == 16
    for i in range(20):
        submit(engine, f"r{i}", prompt(8, seed=i), max_tokens=4, ignore_eos=True)
    engine.step()
    assert len(engine.scheduler.running) == 16 and len(engine.scheduler.waiting) == 4
    assert make_engine(num_blocks=64, max_num_seqs=20).args.max_num_seqs == 20
