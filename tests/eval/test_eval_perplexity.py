"""`server.eval.perplexity` through the engine's cache path, against mlx-lm's own forward."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from support.engine_harness import demo_engine_model, demo_model

from server.eval.perplexity import Result, ratio, score, windows
from server.kernels.dense_cache import DenseLatentCache, dense_bytes_per_token

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And God said, Let there be light: and there was light. "
) * 4


def test_bf16_cache_matches_mlx_lm_forward_and_int4_stays_close():
    model, tok = demo_model()
    wins = windows(tok.encode(TEXT), 96, 2)
    assert len(wins) == 2
    dense = score(demo_engine_model(), wins, "bf16", prefill=1, batch=2)
    int4 = score(demo_engine_model(), wins, "int4", prefill=40, batch=2, chunk=16)  # prefill in chunks, then decode
    x = mx.array(wins)
    ref = nn.losses.cross_entropy(model(x[:, :-1]).astype(mx.float32), x[:, 1:], reduction="none")
    ref_np = np.array(ref, dtype=np.float64)
    # The bf16 cache rounds the latent to bf16 only: per token within a few hundredths of a nat.
    assert np.abs(dense.nll - ref_np).mean() < 0.02
    assert np.abs(dense.nll - ref_np).max() < 0.25
    assert abs(dense.ppl / math.exp(ref_np.mean()) - 1) < 0.005
    q, lo, hi = ratio(int4, Result("bf16", dense.nll[:, 39:], 0.0))
    assert lo <= q <= hi and abs(q - 1) < 0.05
    assert dense.ppl < 200  # the trained model, not the random one (vocabulary 2048)


def test_dense_cache_read_back_and_size():
    cache = DenseLatentCache(num_blocks=4, block_size=8, R=128, P=16)
    latent = mx.random.normal((5, 128))
    k_pe = mx.random.normal((5, 16))
    cache.write(mx.array([8, 9, 10, 11, 12], mx.int32), latent, k_pe)
    got, got_pe = cache.read(mx.array([1], mx.int32), 5)
    assert mx.array_equal(got, latent.astype(mx.bfloat16))
    assert mx.array_equal(got_pe, k_pe.astype(mx.bfloat16))
    assert cache.bytes_per_token == dense_bytes_per_token(128, 16) == 288
    assert dense_bytes_per_token(256, 64) == 640  # Mistral Small 4's bf16 latent
