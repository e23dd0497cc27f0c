"""Backend choice and the shapes each fused kernel accepts (host-side logic; runs on CPU)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from server.kernels.cases import decode_inputs, filled_cache
from server.kernels.fused import TileConfig, choose_config, unsupported_reason
from server.kernels.latent_cache import LatentCache
from server.kernels.mla_decode import default_backend, mla_decode_append


def test_cpu_uses_the_reference():
    assert default_backend() == "reference"
    cache, table = filled_cache([5, 70], 256, 64, mx.float16)
    args = decode_inputs(2, 4, 256, 64, mx.float16)
    ctx = mx.array([5, 70], mx.int32)
    out = mla_decode_append(*args, cache, table, ctx, 0.1)
    assert out.shape == (2, 4, 256) and out.dtype == mx.float16
    assert cache.last_out is None  # only the fused kernels chain through it


def test_unknown_backend_is_refused():
    cache, table = filled_cache([3], 256, 64, mx.float16)
    with pytest.raises(ValueError):
        mla_decode_append(*decode_inputs(1, 4, 256, 64, mx.float16), cache, table,
                          mx.array([3], mx.int32), 0.1, backend="vulkan")


@pytest.mark.parametrize("R,H", [(256, 32), (512, 128), (512, 16), (256, 1)])
def test_default_tiles_fit_each_backend(R, H):
    cache = LatentCache(4, 64, R, 64, 64, mx.bfloat16)
    for backend in ("cuda", "metal"):
        cfg = choose_config(backend, 4, H, R, 64, 100, 64)
        reason = unsupported_reason(backend, cache, cfg)
        # Metal's 32 KB of threadgroup memory holds R=256 tiles but not R=512 ones (those fall
        # back to the reference); CUDA takes every shape.
        assert (reason is None) == (backend == "cuda" or R == 256), reason


def test_splits_follow_the_batch():
    long_single = choose_config("cuda", 1, 32, 256, 64, 513, 64)
    big_batch = choose_config("cuda", 16, 32, 256, 64, 513, 64)
    assert long_single.pps < big_batch.pps  # one long sequence is cut into more splits
    assert choose_config("cuda", 1, 32, 256, 64, 3, 64).pps == 3  # short: one split, no combine


def test_unsupported_shapes_are_named():
    f32 = LatentCache(2, 64, 256, 64, 64, mx.float32)
    assert "dtype" in unsupported_reason("cuda", f32, TileConfig(32, 64, 8, 4))
    odd = LatentCache(2, 64, 256, 64, 64, mx.float16)
    assert "warps" in unsupported_reason("cuda", odd, TileConfig(32, 64, 3, 4))
    assert "tiles" in unsupported_reason("cuda", LatentCache(2, 48, 256, 64, 64, mx.float16),
                                         TileConfig(32, 64, 8, 4))
