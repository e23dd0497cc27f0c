"""The plain-MLX reference decode step against the independent numpy implementation."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from support.kernel_numpy_ref import decode_np, dequantize_np

from server.bench.kernel_cases import (
    GROUP_CASES,
    POISONED_CASES,
    SHAPE_CASES,
    Case,
    cache_as_numpy,
    decode_inputs,
    filled_cache,
    poison_table,
)
from server.kernels.latent_cache import LatentCache
from server.kernels.mla_decode import mla_decode_append

on_gpu = mx.default_device() == mx.gpu

# Every shape case uses quant group 64; GROUP_CASES take 32 and 128.
CASES = [*SHAPE_CASES, Case(list(range(0, 160, 10)), 4, 256, mx.bfloat16), *GROUP_CASES, *POISONED_CASES]  # B=16


def case_id(c: Case) -> str:
    return f"B{len(c.lens)}-H{c.H}-R{c.R}-{str(c.dtype).split('.')[-1]}-gs{c.group_size}" + ("-bad" * c.poisoned)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_matches_numpy(case: Case) -> None:
    lens, H, R, dtype, gs = case.lens, case.H, case.R, case.dtype, case.group_size
    P = 64
    cache, table = filled_cache(lens, R, P, dtype, group_size=gs)
    if case.poisoned:
        table = poison_table(table, cache.num_blocks)
    ql, qp, nl, nk = decode_inputs(len(lens), H, R, P, dtype)
    scale = 1.0 / math.sqrt(R + P)
    ctx = mx.array(lens, dtype=mx.int32)
    out = mla_decode_append(ql, qp, nl, nk, cache, table, ctx, scale, backend="reference")
    mx.eval(out, *cache.arrays())
    assert out.shape == (len(lens), H, R) and out.dtype == dtype

    want = decode_np(
        np.array(ql.astype(mx.float32)),
        np.array(qp.astype(mx.float32)),
        cache_as_numpy(cache),
        np.array(table),
        lens,
        scale,
        cache.group_size,
        cache.block_size,
    )
    got = np.array(out.astype(mx.float32))
    # Outputs reach |4|; one bf16 ulp there is 0.016, one fp16 ulp 0.002.
    tol = 3e-2 if dtype == mx.bfloat16 else 4e-3
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_appended_bytes_equal_mx_quantize(gs: int) -> None:
    lens = [0, 63, 64, 5]
    R, P, dtype = 256, 64, mx.float16
    cache, table = filled_cache(lens, R, P, dtype, group_size=gs)
    before = cache_as_numpy(cache)
    ql, qp, nl, nk = decode_inputs(len(lens), 4, R, P, dtype)
    out = mla_decode_append(ql, qp, nl, nk, cache, table, mx.array(lens, dtype=mx.int32), 0.1, backend="reference")
    mx.eval(out, *cache.arrays())
    q, s, b = mx.quantize(nl, gs, 4)
    after = cache_as_numpy(cache)
    tbl = np.array(table)
    touched = np.zeros(cache.packed.shape[:2], bool)
    for i, n in enumerate(lens):
        blk, off = tbl[i, n // cache.block_size], n % cache.block_size
        touched[blk, off] = True
        np.testing.assert_array_equal(after["packed"][blk, off], np.array(q[i]))
        np.testing.assert_array_equal(after["scales"][blk, off], np.array(s[i].astype(mx.float32)))
        np.testing.assert_array_equal(after["biases"][blk, off], np.array(b[i].astype(mx.float32)))
        np.testing.assert_array_equal(after["k_pe"][blk, off], np.array(nk[i].astype(mx.float32)))
    for k in ("packed", "scales", "biases", "k_pe"):
        np.testing.assert_array_equal(after[k][~touched], before[k][~touched])


def test_bad_block_ids_are_neither_read_nor_written() -> None:
    """Entries outside [0, num_blocks) (a wrong table): nothing outside the pool is touched, the
    bad append is dropped (its row repeats a valid one's write), the valid appends land."""
    lens = [100, 70, 5]
    R, P, dtype = 256, 64, mx.float16
    cache, table = filled_cache(lens, R, P, dtype)
    table = poison_table(table, cache.num_blocks)
    before = cache_as_numpy(cache)
    ql, qp, nl, nk = decode_inputs(len(lens), 4, R, P, dtype)
    out = mla_decode_append(ql, qp, nl, nk, cache, table, mx.array(lens, mx.int32), 0.1, backend="reference")
    mx.eval(out, *cache.arrays())
    assert bool(mx.isfinite(out).all().item())
    after = cache_as_numpy(cache)
    q, _, _ = mx.quantize(nl, 64, 4)
    tbl = np.array(table)
    touched = np.zeros(cache.packed.shape[:2], bool)
    for i in (0, 2):  # sequence 1's append block is outside the pool
        blk, off = tbl[i, lens[i] // 64], lens[i] % 64
        touched[blk, off] = True
        np.testing.assert_array_equal(after["packed"][blk, off], np.array(q[i]))
    for k in ("packed", "scales", "biases", "k_pe"):
        np.testing.assert_array_equal(after[k][~touched], before[k][~touched])


def test_new_token_counts_as_if_cached() -> None:
    """A token appended by the decode step weighs the same as one written earlier by prefill."""
    R, P, H, dtype = 256, 64, 8, mx.float16
    cache, table = filled_cache([10], R, P, dtype)
    ql, qp, nl, nk = decode_inputs(1, H, R, P, dtype)
    out_now = mla_decode_append(ql, qp, nl, nk, cache, table, mx.array([10], mx.int32), 0.1, backend="reference")

    earlier, _ = filled_cache([10], R, P, dtype)
    pos10 = table[0, 0:1] * 64 + 10
    earlier.write(pos10, nl, nk)
    lat, kpe = earlier.read(table[0, :1], 11)
    lat = lat.astype(mx.float32)
    s = 0.1 * (ql[0].astype(mx.float32) @ lat.T + qp[0].astype(mx.float32) @ kpe.astype(mx.float32).T)
    out_earlier = (mx.softmax(s, axis=-1) @ lat).astype(dtype)
    if on_gpu:  # GPU matmuls over 64 padded tokens and over 11 may round differently
        np.testing.assert_allclose(np.array(out_now[0]), np.array(out_earlier), atol=4e-3, rtol=4e-3)
    else:
        np.testing.assert_array_equal(np.array(out_now[0]), np.array(out_earlier))


def test_cache_write_read_roundtrip() -> None:
    R, P = 128, 64
    cache = LatentCache(4, 16, R, P, 64, mx.bfloat16)
    x = mx.random.normal((40, R))
    k = mx.random.normal((40, P))
    blocks = mx.array([2, 0, 3], mx.int32)
    pos = mx.arange(40)
    slots = blocks[pos // 16] * 16 + pos % 16
    cache.write(slots, x, k)
    lat, kpe = cache.read(blocks, 40)
    mx.eval(lat, kpe)
    assert lat.shape == (40, R) and lat.dtype == mx.bfloat16 and kpe.shape == (40, P)
    q, s, b = mx.quantize(x.astype(mx.bfloat16), 64, 4)
    want = dequantize_np(np.array(q), np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32)), 64)
    np.testing.assert_allclose(np.array(lat.astype(mx.float32)), want, atol=2e-2, rtol=1e-2)
    np.testing.assert_array_equal(np.array(kpe.astype(mx.float32)), np.array(k.astype(mx.bfloat16).astype(mx.float32)))
    assert cache.bytes_per_token == 4 * 16 + 2 * (2 * 2 + 64)
    assert cache.nbytes == 4 * 16 * cache.bytes_per_token
