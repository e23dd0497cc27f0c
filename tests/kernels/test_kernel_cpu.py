"""The plain-MLX CPU decode path (server/kernels/cpu_decode.py) against the reference, its oracle."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

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
from server.kernels import cpu_decode
from server.kernels.latent_cache import LatentCache
from server.kernels.mla_decode import mla_decode_append
from server.kernels.selfcheck import check_fused_decode
from server.platform import current_platform

# Lengths crossing block edges (0, 1, 63, 64, 65, 130, thousands), 1 to 128 heads (both sides of
# DEQUANT_FROM_HEADS), R 128/256/512, both half types, quant groups 32/64/128, bad block ids.
CASES = [
    *SHAPE_CASES,
    Case(list(range(0, 160, 10)), 4, 256, mx.bfloat16),  # B=16
    Case([1023, 1024, 1025, 64, 0, 1], 4, 128, mx.bfloat16),  # the demo model's width
    Case([200, 63, 65], 7, 128, mx.float16),
    Case([200, 63, 65], 8, 128, mx.float16),
    *GROUP_CASES,
    *POISONED_CASES,
]


def case_id(c: Case) -> str:
    return f"B{len(c.lens)}-H{c.H}-R{c.R}-{str(c.dtype).split('.')[-1]}-gs{c.group_size}" + ("-bad" * c.poisoned)


def run_both(
    lens: list[int], H: int, R: int, dtype: mx.Dtype, gs: int = 64, poisoned: bool = False, pad: int = 0
) -> tuple[mx.array, mx.array, LatentCache, LatentCache, dict[str, np.ndarray]]:
    """(reference out, cpu out, reference cache, cpu cache, the fields before): the same step on
    two copies of one cache; `pad` extra padding columns (-1) on the block table."""
    P = 64 if R > 128 else 16
    ref_cache, table = filled_cache(lens, R, P, dtype, group_size=gs)
    cpu_cache, _ = filled_cache(lens, R, P, dtype, group_size=gs)
    if poisoned:
        table = poison_table(table, ref_cache.num_blocks)
    if pad:
        table = mx.concatenate([table, mx.full((len(lens), pad), -1, mx.int32)], axis=1)
    before = cache_as_numpy(ref_cache)
    args = decode_inputs(len(lens), H, R, P, dtype)
    ctx = mx.array(lens, mx.int32)
    scale = 1.0 / math.sqrt(R + P)
    ref = mla_decode_append(*args, ref_cache, table, ctx, scale, backend="reference")
    got = mla_decode_append(*args, cpu_cache, table, ctx, scale, backend="cpu")
    mx.eval(ref, got, *ref_cache.arrays(), *cpu_cache.arrays())
    return ref, got, ref_cache, cpu_cache, before


def assert_close(got: mx.array, ref: mx.array, dtype: mx.Dtype) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    g, r = np.array(got.astype(mx.float32)), np.array(ref.astype(mx.float32))
    assert np.isfinite(g).all()
    # Both in float32 up to the final cast; they differ in summation order and in the reference
    # rounding the dequantized latent to the cache dtype: about one output ulp.
    tol = 3e-2 if dtype == mx.bfloat16 else 4e-3
    np.testing.assert_allclose(g, r, atol=tol, rtol=tol)
    rel = 2e-2 if dtype == mx.bfloat16 else 5e-3  # the self-check's tolerance for a fused kernel
    assert np.linalg.norm(g - r) <= rel * max(np.linalg.norm(r), 1e-30)


def assert_same_bytes(a: LatentCache, b: LatentCache) -> None:
    for x, y in zip(a.arrays(), b.arrays(), strict=True):
        assert x.dtype == y.dtype
        assert bool(mx.array_equal(x, y).item())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_path_matches_the_reference(case: Case) -> None:
    ref, got, ref_cache, cpu_cache, _ = run_both(case.lens, case.H, case.R, case.dtype, case.group_size, case.poisoned)
    assert_close(got, ref, case.dtype)
    assert_same_bytes(ref_cache, cpu_cache)


@pytest.mark.parametrize("pad", [1, 5])
def test_padded_block_tables(pad: int) -> None:
    """Padding columns (-1) past each row's blocks are never weighed."""
    ref, got, ref_cache, cpu_cache, _ = run_both([0, 64, 127, 3], 8, 256, mx.bfloat16, pad=pad)
    assert_close(got, ref, mx.bfloat16)
    assert_same_bytes(ref_cache, cpu_cache)
    unpadded, _, _, _, _ = run_both([0, 64, 127, 3], 8, 256, mx.bfloat16)
    assert_close(got, unpadded, mx.bfloat16)


def test_out_of_pool_ids_touch_nothing_else() -> None:
    """Bad block ids: the bytes written are the reference's, and only the valid appends' slots."""
    lens = [200, 64, 3000, 0]
    ref, got, ref_cache, cpu_cache, before = run_both(lens, 32, 256, mx.bfloat16, poisoned=True)
    assert_close(got, ref, mx.bfloat16)
    assert_same_bytes(ref_cache, cpu_cache)
    after = cache_as_numpy(cpu_cache)
    changed = np.zeros(cpu_cache.packed.shape[:2], bool)
    for k in ("packed", "scales", "biases", "k_pe"):
        diff = after[k] != before[k]
        changed |= diff.reshape(*diff.shape[:2], -1).any(axis=-1)
    assert changed.sum() <= len(lens)  # at most one slot per sequence (sequence 1's is dropped)


def test_a_row_with_no_token_is_zeros() -> None:
    """Sequence 0's only block is outside the pool: no token left, out is zeros, not NaN."""
    lens = [5, 70]
    R, P, dtype = 128, 16, mx.bfloat16
    cache, table = filled_cache(lens, R, P, dtype)
    t = np.array(table)
    t[0, :] = -3
    out = mla_decode_append(
        *decode_inputs(2, 4, R, P, dtype), cache, mx.array(t), mx.array(lens, mx.int32), 0.1, backend="cpu"
    )
    mx.eval(out)
    assert bool((out[0] == 0).all().item()) and bool(mx.isfinite(out).all().item())
    assert float(mx.abs(out[1]).max().item()) > 0


@pytest.mark.parametrize("chunk", [1, 1 << 40])
def test_chunked_scores_match(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """The many-head scores, one sequence per chunk or all at once."""
    monkeypatch.setattr(cpu_decode, "CHUNK_FLOATS", chunk)
    ref, got, ref_cache, cpu_cache, _ = run_both([65, 0, 64, 1, 63, 7, 130, 2], 16, 512, mx.bfloat16)
    assert_close(got, ref, mx.bfloat16)
    assert_same_bytes(ref_cache, cpu_cache)


def test_consecutive_steps_track_the_reference() -> None:
    """Ten steps, each appending: outputs and bytes stay with the reference's."""
    lens = [60, 0, 130]
    R, P, H, dtype = 128, 16, 4, mx.bfloat16
    ref_cache, table = filled_cache(lens, R, P, dtype)
    cpu_cache, _ = filled_cache(lens, R, P, dtype)
    for step in range(10):
        args = decode_inputs(len(lens), H, R, P, dtype, seed=step)
        ctx = mx.array([n + step for n in lens], mx.int32)
        ref = mla_decode_append(*args, ref_cache, table, ctx, 0.2, backend="reference")
        got = mla_decode_append(*args, cpu_cache, table, ctx, 0.2, backend="cpu")
        mx.eval(ref, got, *ref_cache.arrays(), *cpu_cache.arrays())
        assert_close(got, ref, dtype)
        assert_same_bytes(ref_cache, cpu_cache)


def test_cpu_backend_is_chosen_or_forced_without_a_fused_check() -> None:
    if current_platform().backend == "cpu":
        assert check_fused_decode(128, 16, 4, mx.bfloat16, 64, 64).backend == "cpu"
    v = check_fused_decode(128, 16, 4, mx.bfloat16, 64, 64, forced="cpu")
    assert (v.backend, v.checked, v.ok) == ("cpu", None, True) and "forced" in v.detail
