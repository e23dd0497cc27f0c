"""Start-up self-check: the fused decode kernel against the reference, on the model's own shapes.

    verdict = check_fused_decode(R, P, H, dtype, group_size, block_size, forced=None)

runs one small decode step (a few sequences of mixed lengths, one crossing a split) through the
fused kernel this device would use and through the plain-MLX reference, and compares `out` and
the appended cache bytes. If the kernel fails to compile or run, or differs beyond tolerance, it
logs one error with the numbers and its verdict names the reference. The returned `Verdict` says
which backend decodes these shapes: the engine's factory hands `verdict.backend` to its model
runner, and /health shows the verdict.

`forced` is the engine's --decode-backend option when not "auto": "reference" (or "cpu") skips
the check and decodes through that plain-MLX path; "cuda" (or "metal") runs the check, logs its
outcome, and keeps the fused kernel even on a failure (to debug it).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import cast

import mlx.core as mx

from ..platform import current_platform
from .latent_cache import LatentCache
from .mla_decode import BACKENDS, mla_decode_append, mla_decode_append_fused
from .tiles import choose_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    backend: str  # the backend that decodes from now on: "cuda", "metal", "cpu" or "reference"
    checked: str | None  # the fused backend that was run against the reference, if any
    ok: bool  # False: the fused kernel failed (compile, run, or tolerance)
    detail: str  # one line: the numbers, or why no check ran
    max_abs: float | None = None
    rel: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _item(a: mx.array) -> float:
    return float(cast(float, a.item()))


def _tolerance(dtype: mx.Dtype) -> float:
    """Relative L2 error allowed against the reference (one ulp of the output type, about)."""
    return 2e-2 if dtype == mx.bfloat16 else 5e-3


def _problem(
    R: int, P: int, H: int, dtype: mx.Dtype, group_size: int, block_size: int, lens: list[int]
) -> tuple[LatentCache, mx.array, tuple[mx.array, mx.array, mx.array, mx.array]]:
    """A cache holding random tokens for `lens` in interleaved blocks, its table, decode inputs."""
    need = [(n + 1 + block_size - 1) // block_size for n in lens]
    width = max(need)
    table = [[b + len(lens) * j for j in range(width)] for b in range(len(lens))]
    cache = LatentCache(len(lens) * width, block_size, R, P, group_size, dtype)
    key = mx.random.key(7)
    keys = mx.random.split(key, 6)
    slots = [
        row[p // block_size] * block_size + p % block_size for row, n in zip(table, lens, strict=True) for p in range(n)
    ]
    if slots:
        n = len(slots)
        cache.write(
            mx.array(slots, mx.int32), mx.random.normal((n, R), key=keys[0]), mx.random.normal((n, P), key=keys[1])
        )
    B = len(lens)
    ql, qp, nl, nk = (
        mx.random.normal(shape, key=k).astype(dtype)
        for shape, k in zip(((B, H, R), (B, H, P), (B, R), (B, P)), keys[2:], strict=True)
    )
    mx.eval(*cache.arrays(), ql, qp, nl, nk)
    return cache, mx.array(table, mx.int32), (ql, qp, nl, nk)


def check_fused_decode(
    R: int,
    P: int,
    H: int,
    dtype: mx.Dtype,
    group_size: int,
    block_size: int,
    *,
    forced: str | None = None,
    lens: list[int] | None = None,
) -> Verdict:
    """Which backend decodes these shapes: `forced` (one of `mla_decode.BACKENDS`), else this
    device's, its fused kernel checked first; on a failure the reference (unless a fused backend
    is forced). Never raises for a kernel failure."""
    if forced not in (None, *BACKENDS):
        raise ValueError(f"unknown backend {forced!r}; expected one of {BACKENDS}")
    if forced == "reference":
        return Verdict("reference", None, True, "forced (--decode-backend reference): no check")
    if forced == "cpu":
        return Verdict("cpu", None, True, "forced (--decode-backend cpu): plain MLX, no check")
    platform = current_platform()
    candidate = forced or platform.defaults.decode_backend
    if candidate == "cpu":
        return Verdict(candidate, None, True, f"no fused kernel on this device ({platform.backend}): plain MLX")
    # Lengths 0, 1 and a block edge, and one long enough to be cut into splits.
    lens = lens or [0, 1, block_size - 1, 8 * block_size + 3]
    scale = 1.0 / math.sqrt(R + P)
    ctx = mx.array(lens, mx.int32)
    t0 = time.perf_counter()
    try:
        ref_cache, table, args = _problem(R, P, H, dtype, group_size, block_size, lens)
        got_cache, _, _ = _problem(R, P, H, dtype, group_size, block_size, lens)
        ref = mla_decode_append(*args, ref_cache, table, ctx, scale, backend="reference")
        # Small splits, so that the split and combine launches run as well as the direct one.
        cfg = choose_config(candidate, len(lens), H, R, P, table.shape[1], block_size, group_size=group_size)
        split_cfg = replace(cfg, pps=2)
        got = mla_decode_append_fused(candidate, *args, got_cache, table, ctx, scale)
        again, _, _ = _problem(R, P, H, dtype, group_size, block_size, lens)
        got_split = mla_decode_append_fused(candidate, *args, again, table, ctx, scale, split_cfg)
        mx.eval(ref, got, got_split, *ref_cache.arrays(), *got_cache.arrays(), *again.arrays())
        r = ref.astype(mx.float32)
        norm = max(_item(mx.linalg.norm(r.flatten())), 1e-30)
        max_abs, rel = 0.0, 0.0
        for g in (got, got_split):
            d = (g.astype(mx.float32) - r).flatten()
            finite = bool(mx.isfinite(d).all().item())
            max_abs = max(max_abs, _item(mx.abs(d).max()) if finite else math.inf)
            rel = max(rel, _item(mx.linalg.norm(d)) / norm if finite else math.inf)
        same = all(
            bool(mx.array_equal(a, b).item()) and bool(mx.array_equal(a, c).item())
            for a, b, c in zip(ref_cache.arrays(), got_cache.arrays(), again.arrays(), strict=True)
        )
    except NotImplementedError as exc:  # shapes the kernel does not cover (e.g. a float32 cache)
        detail = f"the fused kernel does not cover this model ({exc}); the reference decodes it"
        log.info("%s", detail)
        return Verdict("reference", None, True, detail, seconds=time.perf_counter() - t0)
    except Exception as exc:  # a compile or launch failure: MLX raises RuntimeError, ValueError, ...
        return _fail(candidate, forced, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", None, None, t0)
    shapes = f"R={R} P={P} H={H} {dtype} group={group_size} block={block_size} lens={lens}"
    numbers = f"max_abs={max_abs:.3g} rel={rel:.3g} (tolerance {_tolerance(dtype):g}), appended bytes equal: {same}"
    if rel < _tolerance(dtype) and same:
        seconds = time.perf_counter() - t0
        log.info("fused MLA decode (%s) matches the reference: %s; %s", candidate, shapes, numbers)
        return Verdict(candidate, candidate, True, f"{shapes}: {numbers}", max_abs, rel, seconds)
    return _fail(candidate, forced, f"{shapes}: {numbers}", max_abs, rel, t0)


def _fail(
    candidate: str, forced: str | None, detail: str, max_abs: float | None, rel: float | None, t0: float
) -> Verdict:
    seconds = time.perf_counter() - t0
    if forced:
        log.error("fused MLA decode (%s) FAILED its self-check, kept because it is forced: %s", candidate, detail)
        return Verdict(candidate, candidate, False, detail, max_abs, rel, seconds)
    log.error(
        "fused MLA decode (%s) FAILED its self-check; decoding through the plain-MLX reference for this process: %s",
        candidate,
        detail,
    )
    return Verdict("reference", candidate, False, detail, max_abs, rel, seconds)
