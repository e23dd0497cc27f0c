"""The engine's greedy tokens equal a plain mlx-lm loop with the same INT4 latent quantization,
alone, chunked, inside batches that start at different steps, and after preemption; and with
prefill attention at CUDA's bucketed lengths as without."""

import pytest
from support.engine_harness import demo_model, make_engine, prompt, run_until_idle, submit
from support.hardware import needs_reference_decode
from support.reference_loop import greedy_reference

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset


@pytest.fixture(params=["off", "on"])
def buckets(request) -> str:
    """Each test twice: prefill attention at the chunk's own lengths (Metal, the CPU), and padded
    to bucketed lengths as on CUDA (`EngineArgs.prefill_buckets`, `mla_attention.sdpa_layout`)."""
    return request.param


@needs_reference_decode
def test_greedy_matches_reference_loop(buckets):
    model, _ = demo_model()
    # 300 tokens cross the llama-4 scale's step at position 256 and several cache blocks.
    ids = prompt(300)
    expected = greedy_reference(model, ids, 24)
    engine = make_engine(prefill_chunk_size=128, prefill_buckets=buckets)
    out = submit(engine, "a", ids, max_tokens=24, ignore_eos=True)
    run_until_idle(engine)
    assert out.token_ids == expected
    assert out.finish_reason == "length"


@needs_reference_decode
def test_same_tokens_alone_and_in_a_staggered_batch(buckets):
    target = prompt(90, seed=1)
    alone_engine = make_engine(prefill_buckets=buckets)
    alone = submit(alone_engine, "t", target, max_tokens=20, ignore_eos=True)
    run_until_idle(alone_engine)

    engine = make_engine(prefill_chunk_size=64, max_num_batched_tokens=256, prefill_buckets=buckets)
    others = []
    for i in range(4):
        others.append(submit(engine, f"o{i}", prompt(10 + 37 * i, seed=10 + i), max_tokens=12 + i, ignore_eos=True))
    engine.step()
    engine.step()
    mine = submit(engine, "t", target, max_tokens=20, ignore_eos=True)
    for i in range(4, 8):
        engine.step()
        others.append(submit(engine, f"o{i}", prompt(200 - 20 * i, seed=10 + i), max_tokens=30, ignore_eos=True))
    run_until_idle(engine)
    assert mine.token_ids == alone.token_ids
    assert all(o.finish_reason == "length" for o in others)


@needs_reference_decode
def test_preempted_request_output_equals_unpreempted():
    ids = [prompt(100, seed=s) for s in range(3)]
    roomy = make_engine(num_blocks=64)
    ref = [submit(roomy, f"r{i}", p, max_tokens=60, ignore_eos=True) for i, p in enumerate(ids)]
    run_until_idle(roomy)

    # 3 x 160 tokens need 9 blocks: 7 forces the newest sequence out while the others grow.
    tight = make_engine(num_blocks=7, max_model_len=448)
    outs = [submit(tight, f"r{i}", p, max_tokens=60, ignore_eos=True) for i, p in enumerate(ids)]
    run_until_idle(tight)
    assert tight.counters["preemptions"] > 0
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert tight.blocks.num_free == 7
