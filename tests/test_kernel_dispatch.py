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


def test_fused_launch_keeps_the_in_place_invariants(monkeypatch):
    """The host side of the fused path, with a stand-in kernel (no GPU here): the cache fields
    themselves go in (no copy), each call takes the previous call's output (GPU ordering), and
    the fields come back as views that depend on the step (MLX ordering)."""
    from server.kernels import fused

    calls = []

    def fake_kernel(backend, kind, smem):
        def run(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            calls.append((kind, inputs))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return run

    monkeypatch.setattr(fused, "_kernel", fake_kernel)
    cache, table = filled_cache([100, 5], 256, 64, mx.bfloat16)
    before = [mx.array(a) for a in cache.arrays()]
    args = decode_inputs(2, 32, 256, 64, mx.bfloat16)
    ctx = mx.array([100, 5], mx.int32)
    cfg = TileConfig(32, 64, 8, 1)  # two splits of one block: partial + combine
    fields = cache.arrays()
    out1 = fused.mla_decode_append_fused("cuda", *args, cache, table, ctx, 0.1, cfg)
    (k1, in1), (k2, _) = calls
    assert (k1, k2) == ("split", "combine")
    assert all(a is b for a, b in zip(in1[4:8], fields))
    assert cache.last_out is out1
    fields = cache.arrays()
    out2 = fused.mla_decode_append_fused("cuda", *args, cache, table, ctx, 0.1, cfg)
    assert calls[2][1][11] is out1 and cache.last_out is out2
    assert all(a is b for a, b in zip(calls[2][1][4:8], fields))
    mx.eval(out2, *cache.arrays())
    for old, new in zip(before, cache.arrays()):
        assert mx.array_equal(old, new)  # the stand-in wrote nothing; the views show the pool
