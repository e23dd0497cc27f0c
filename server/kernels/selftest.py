"""Check the GPU kernel of this machine (Metal or CUDA) against the reference, and time it.

    python -m server.kernels.selftest [--quick] [--no-timings]

Prints, per shape: max abs and relative error of `out` against the reference, whether the
appended bytes equal the reference's (`mx.quantize` on this device), the other cache bytes
untouched, then timings and a peak-memory check of the in-place append. Exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import mlx.core as mx
import numpy as np

from .cases import SHAPE_CASES, contiguous_tables, decode_inputs, filled_cache, random_pool
from .mla_decode import default_backend, mla_decode_append

# The CPU test's shapes, plus a full B=16 batch, long single sequences and DeepSeek-sized ones.
CHECKS = SHAPE_CASES + [
    (list(range(0, 1600, 100)), 32, 256, mx.bfloat16),  # B=16
    ([20000], 32, 256, mx.float16),                     # many splits
    ([4000, 17, 1000, 2047], 128, 512, mx.float16),
]


def check(backend: str, lens, H, R, dtype, P=64) -> bool:
    scale = 1.0 / math.sqrt(R + P)
    ctx = mx.array(lens, dtype=mx.int32)
    ref_cache, table = filled_cache(lens, R, P, dtype)
    gpu_cache, _ = filled_cache(lens, R, P, dtype)
    args = decode_inputs(len(lens), H, R, P, dtype)
    ref = mla_decode_append(*args, ref_cache, table, ctx, scale, backend="reference")
    got = mla_decode_append(*args, gpu_cache, table, ctx, scale, backend=backend)
    mx.eval(ref, got, *ref_cache.arrays(), *gpu_cache.arrays())
    r, g = np.array(ref.astype(mx.float32)), np.array(got.astype(mx.float32))
    abs_err = float(np.abs(r - g).max())
    rel_err = float(np.linalg.norm(r - g) / max(np.linalg.norm(r), 1e-30))
    same = {k: bool(mx.array_equal(a, b).item())
            for k, a, b in zip(("packed", "scales", "biases", "k_pe"),
                               ref_cache.arrays(), gpu_cache.arrays())}
    ok = np.isfinite(g).all() and rel_err < (2e-2 if dtype == mx.bfloat16 else 5e-3) \
        and all(same.values())
    print(f"{'ok ' if ok else 'BAD'} B={len(lens):2d} H={H:3d} R={R} {str(dtype):14s} "
          f"max_len={max(lens):5d}  max_abs={abs_err:.2e} rel={rel_err:.2e}  "
          f"cache bytes equal: {same}")
    return ok


def timed(fn, reps: int = 50) -> float:
    """Median seconds per call."""
    for _ in range(3):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def timings(backend: str, quick: bool) -> None:
    H, R, P, dtype = 32, 256, 64, mx.bfloat16
    shapes = [(1, 1024), (1, 32768), (16, 8192)] if quick else \
        [(1, 1024), (1, 32768), (16, 8192), (16, 32768)]
    for B, S in shapes:
        max_blocks = S // 64 + 1
        cache = random_pool(B * max_blocks, 64, R, P, dtype)
        table = contiguous_tables(B, max_blocks)
        ctx = mx.full((B,), S - 1, mx.int32)
        args = decode_inputs(B, H, R, P, dtype)
        for be in (backend, "reference"):
            if be == "reference" and B * S > 16 * 8192:
                continue
            t = timed(lambda: mla_decode_append(*args, cache, table, ctx, 0.05, backend=be))
            gbs = B * S * cache.bytes_per_token / t / 1e9
            print(f"time {be:9s} B={B:2d} S={S:5d}: {t * 1e3:8.3f} ms  {gbs:7.1f} GB/s of cache")


def memory(backend: str) -> bool:
    """A decode step on a large pool allocates nothing proportional to the pool."""
    R, P, dtype, B = 256, 64, mx.bfloat16, 4
    cache = random_pool(32768, 64, R, P, dtype)  # 2M tokens, ~570 MB
    table = contiguous_tables(B, 64)
    ctx = mx.array([100, 4000, 64, 2], mx.int32)
    args = decode_inputs(B, 32, R, P, dtype)
    mx.eval(*args)
    out = mla_decode_append(*args, cache, table, ctx, 0.05, backend=backend)
    mx.eval(out, *cache.arrays())
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out = mla_decode_append(*args, cache, table, ctx + 1, 0.05, backend=backend)
    mx.eval(out, *cache.arrays())
    grew = mx.get_peak_memory() - base
    ok = grew < cache.nbytes / 100
    print(f"{'ok ' if ok else 'BAD'} peak memory of a step over a {cache.nbytes / 1e6:.0f} MB "
          f"pool: +{grew / 1e6:.2f} MB")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer timing shapes")
    ap.add_argument("--no-timings", action="store_true", help="checks only")
    ap.add_argument("--backend", default=None, help="metal or cuda (default: this device's)")
    a = ap.parse_args()
    backend = a.backend or default_backend()
    if backend == "reference":
        print("no GPU backend on this machine (MLX default device: "
              f"{mx.default_device()}); nothing to check")
        return 0
    print(f"backend {backend}, device {mx.default_device()}")
    ok = all([check(backend, *c) for c in CHECKS])
    ok = memory(backend) and ok
    if not a.no_timings:
        timings(backend, a.quick)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
