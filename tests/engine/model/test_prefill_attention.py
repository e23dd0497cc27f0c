"""Prefill attention at bucketed lengths (CUDA's cuDNN graphs are per shape: `sdpa_layout`):
the buckets are few and tight, the layouts are valid and cheap, and padding never changes what a
real query sees."""

import mlx.core as mx
import numpy as np
import pytest
from support.engine_harness import demo_engine_model, make_engine, prompt, run_until_idle, submit
from support.platforms import pretend

from server.engine.model.mla_attention import SdpaLayout, cudnn_prefill, sdpa_bucket, sdpa_layout, sdpa_mask
from server.engine.model.model_runner import ModelRunner
from server.platform import current_platform

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset


def test_buckets_are_few_tight_and_stable():
    buckets = {sdpa_bucket(n) for n in range(1, 32768 + 1)}
    assert len(buckets) <= 60, len(buckets)
    for n in range(1, 32768 + 1):
        b = sdpa_bucket(n)
        assert b >= n and sdpa_bucket(b) == b
        assert b - n < max(64, n / 8), (n, b)
    assert all(sdpa_bucket(n) <= sdpa_bucket(n + 1) for n in range(1, 32768))


@pytest.mark.parametrize("n", [1, 2, 37, 64, 65, 128, 300, 512, 513, 2048])
def test_layouts_are_buckets_and_never_cost_much_more_than_the_chunk(n):
    for S in range(n, n + 40000, 7):
        lay = sdpa_layout(n, S)
        assert sdpa_bucket(lay.queries) == lay.queries and lay.keys == sdpa_bucket(S)
        assert lay.queries <= lay.keys  # cuDNN refuses a bottom-right causal mask with more queries than keys
        if lay.masked:
            assert lay.front == 0 and lay.queries == sdpa_bucket(n)
        else:  # queries padded after the chunk by as many rows as the keys: the causal alignment
            assert lay.front >= 0 and lay.queries == lay.front + n + lay.keys - S
        # Scores computed (causal skips the triangle above its diagonal): at most the chunk's rows
        # and keys (64 at least each), 2.25 times over (buckets of up to 2x rows, 1.125x keys).
        work = lay.queries * lay.keys - (0 if lay.masked else lay.queries**2 // 2)
        assert work <= 2.25 * max(n, 64) * max(S, 64), (n, S, lay)


def test_a_short_chunk_after_a_long_prefix_is_masked_and_a_fresh_prompt_causal():
    assert sdpa_layout(50, 32818) == SdpaLayout(0, 64, 36864, masked=True)  # a new turn of a long chat
    assert not sdpa_layout(2000, 2000).masked and not sdpa_layout(2048, 10000).masked


def padded_attention(q, k, v, layout, n, S):
    """`q`, `k`, `v` laid out as `layout` says, with garbage (not zeros) in the padding: a real
    query must not see any of it."""
    H, d, dv = q.shape[0], q.shape[-1], v.shape[-1]
    back_q = layout.queries - layout.front - n
    qp = mx.concatenate([mx.full((H, layout.front, d), 9.0), q, mx.full((H, back_q, d), -7.0)], axis=1)
    kp = mx.concatenate([k, mx.full((H, layout.keys - S, d), 5.0)], axis=1)
    vp = mx.concatenate([v, mx.full((H, layout.keys - S, dv), 1e4)], axis=1)
    mask = sdpa_mask(layout, n, S, mx.float32) if layout.masked else "causal"
    out = mx.fast.scaled_dot_product_attention(qp[None], kp[None], vp[None], scale=0.3, mask=mask)[0]
    return out[:, layout.front : layout.front + n]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n, S", [(1, 1), (1, 700), (5, 5), (37, 1100), (64, 64), (100, 613), (300, 300), (513, 2000)])
def test_padded_attention_equals_the_exact_one(n, S, masked):
    H, d, v = 4, 24, 16
    rng = np.random.default_rng(n * 7919 + S)
    q, k, val = (mx.array(rng.standard_normal(shape).astype(np.float32)) for shape in ((H, n, d), (H, S, d), (H, S, v)))
    exact = mx.fast.scaled_dot_product_attention(q[None], k[None], val[None], scale=0.3, mask="causal")[0]
    keys, back = sdpa_bucket(S), sdpa_bucket(S) - S
    layout = (
        SdpaLayout(0, sdpa_bucket(n), keys, masked=True)
        if masked
        else SdpaLayout(sdpa_bucket(n + back) - n - back, sdpa_bucket(n + back), keys, masked=False)
    )
    got = padded_attention(q, k, val, layout, n, S)
    np.testing.assert_allclose(np.array(got), np.array(exact), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "option, padded", [("on", True), ("off", False), ("auto", current_platform().defaults.prefill_buckets)]
)
def test_the_option_decides_whether_the_runner_pads_each_chunk(option, padded):
    engine = make_engine(prefill_buckets=option)
    submit(engine, "a", prompt(100), max_tokens=2)
    _, batch, _ = engine.runner.prepare(engine.scheduler.schedule())
    assert batch.prefills[0].layout == (sdpa_layout(100, 100) if padded else None)


def test_greedy_tokens_are_the_same_through_a_masked_tail():
    # 1030 tokens in chunks of 1024: the 6-token tail over 1030 keys takes the masked layout.
    assert sdpa_layout(6, 1030).masked and not sdpa_layout(1024, 1024).masked
    outs = []
    for option in ("off", "on"):
        engine = make_engine(prefill_buckets=option, prefill_chunk_size=1024, max_num_batched_tokens=1024)
        outs.append(submit(engine, "a", prompt(1030, seed=3), max_tokens=12, ignore_eos=True))
        run_until_idle(engine)
    assert outs[0].token_ids == outs[1].token_ids and len(outs[0].token_ids) == 12


def test_only_heads_cudnn_takes_are_padded_by_default():
    assert cudnn_prefill(64 + 64, 128, mx.bfloat16)  # Mistral Small 4
    assert not cudnn_prefill(128 + 64, 128, mx.bfloat16)  # DeepSeek-V2/V3, Kimi: MLX's composed fallback
    assert not cudnn_prefill(64 + 64, 128, mx.float32)


def test_auto_pads_on_cuda_only_where_cudnn_takes_the_heads(monkeypatch):
    from server.engine.model import model_runner

    model = demo_engine_model()[0]  # as this machine runs it

    def pads() -> bool:
        return ModelRunner(model, num_blocks=4, decode_backend="cpu", prefill_buckets="auto").prefill_buckets

    pretend(monkeypatch, "cuda")
    assert not pads()  # the demo model here is float32
    monkeypatch.setattr(model_runner, "cudnn_prefill", lambda qk, v, dtype: (qk, v, dtype) == (48, 32, mx.float32))
    assert pads()  # its head sizes reach the rule
    pretend(monkeypatch, "metal")
    assert not pads()
