"""Prefill attention at bucketed lengths (CUDA's cuDNN graphs are per shape: `sdpa_padding`):
the buckets are few and tight, and padding never changes what a real query sees."""

import mlx.core as mx
import numpy as np
import pytest
from engine_harness import make_engine, prompt, submit

from server.engine.mla_attention import cudnn_prefill, sdpa_bucket, sdpa_padding
from server.kernels.mla_decode import device_backend


def test_buckets_are_few_tight_and_stable():
    buckets = {sdpa_bucket(n) for n in range(1, 32768 + 1)}
    assert len(buckets) <= 60, len(buckets)
    for n in range(1, 32768 + 1):
        b = sdpa_bucket(n)
        assert b >= n and sdpa_bucket(b) == b
        assert b - n < max(64, n / 8), (n, b)
    assert all(sdpa_bucket(n) <= sdpa_bucket(n + 1) for n in range(1, 32768))


@pytest.mark.parametrize("n", [1, 2, 37, 64, 65, 128, 300, 512, 513, 2048])
def test_padding_makes_both_lengths_buckets_and_queries_never_outnumber_keys(n):
    for S in range(n, n + 5000, 7):
        front, back = sdpa_padding(n, S)
        assert front >= 0 and back >= 0
        queries, keys = front + n + back, S + back
        assert sdpa_bucket(queries) == queries and sdpa_bucket(keys) == keys
        assert queries <= keys  # cuDNN refuses a bottom-right causal mask with more queries than keys


@pytest.mark.parametrize("n, S", [(1, 1), (1, 700), (5, 5), (37, 1100), (64, 64), (100, 613), (300, 300), (513, 2000)])
def test_padded_attention_equals_the_exact_one(n, S):
    H, d, v = 4, 24, 16
    rng = np.random.default_rng(n * 7919 + S)
    q, k, val = (mx.array(rng.standard_normal(shape).astype(np.float32)) for shape in ((H, n, d), (H, S, d), (H, S, v)))
    exact = mx.fast.scaled_dot_product_attention(q[None], k[None], val[None], scale=0.3, mask="causal")[0]
    front, back = sdpa_padding(n, S)
    # Garbage, not zeros, in the padding: a real query must not see it at all.
    qp = mx.concatenate([mx.full((H, front, d), 9.0), q, mx.full((H, back, d), -7.0)], axis=1)
    kp = mx.concatenate([k, mx.full((H, back, d), 5.0)], axis=1)
    vp = mx.concatenate([val, mx.full((H, back, v), 1e4)], axis=1)
    padded = mx.fast.scaled_dot_product_attention(qp[None], kp[None], vp[None], scale=0.3, mask="causal")[0]
    np.testing.assert_allclose(np.array(padded[:, front : front + n]), np.array(exact), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option, padded", [("on", True), ("off", False), ("auto", device_backend() == "cuda")])
def test_the_option_decides_whether_the_runner_pads_each_chunk(option, padded):
    engine = make_engine(prefill_buckets=option)
    submit(engine, "a", prompt(100), max_tokens=2)
    _, batch, _ = engine.runner.prepare(engine.scheduler.schedule())
    assert batch.prefills[0].padding == (sdpa_padding(100, 100) if padded else (0, 0))
    assert sdpa_padding(100, 100) != (0, 0)


def test_only_heads_cudnn_takes_are_padded_by_default():
    assert cudnn_prefill(64 + 64, 128, mx.bfloat16)  # Mistral Small 4
    assert not cudnn_prefill(128 + 64, 128, mx.bfloat16)  # DeepSeek-V2/V3, Kimi: MLX's composed fallback
    assert not cudnn_prefill(64 + 64, 128, mx.float32)
