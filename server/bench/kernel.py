"""Check this machine's fused MLA decode kernel (Metal or CUDA) against the reference, and time it.

    python -m server.bench kernel [--quick] [--no-timings] [--backend metal|cuda]
    python -m server.bench kernel --no-check [--sweep] [--shapes 1x1024,16x32768] [--md docs/benchmarks.md]
    python -m server.bench kernel --merge OTHER.md --md docs/benchmarks.md

The check (skipped with --no-check) prints, per shape: max abs and relative error of `out`
against the plain-MLX reference, whether the appended bytes equal the reference's (`mx.quantize`
on this device), then a peak-memory check of the in-place append; it exits 1 on a failure.

The timings (skipped with --no-timings) compare, at P=64 bf16 and each B x S (x H x R; default
32 x 256, Mistral Small 4's attention) of --shapes: the fused kernel, the reference, mlx-lm's decode path (bf16
latent, SDPA) and the composed INT4 path (dequantize, matmul, softmax, matmul). Each time is the
median over 5 runs of (N chained calls evaluated together) / N; beside it, where torch's CUDA
profiler is installed, the fused launches' own GPU time (CUPTI, without MLX's host work between
launches). GB/s counts the cache bytes each path must read. --md writes the table into that file's kernel section; --merge copies the
kernel section of another file into --md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from server.bench.kernel_cases import (
    GROUP_CASES,
    POISONED_CASES,
    SHAPE_CASES,
    Case,
    contiguous_tables,
    decode_inputs,
    filled_cache,
    poison_table,
    random_pool,
)
from server.kernels.latent_cache import LatentCache
from server.kernels.mla_decode import FUSED, mla_decode_append, mla_decode_append_fused
from server.kernels.tiles import TileConfig, choose_config
from server.platform import current_platform

# The CPU tests' shapes and quant groups, plus a full B=16 batch, a long single sequence and a
# DeepSeek-sized batch.
CHECKS = [
    *SHAPE_CASES,
    *GROUP_CASES,
    *POISONED_CASES,
    Case(list(range(0, 1600, 100)), 32, 256, mx.bfloat16),  # B=16
    Case([20000], 32, 256, mx.float16),  # many splits
    Case([4000, 17, 1000, 2047], 128, 512, mx.float16),
]

P, DT, BS = 64, mx.bfloat16, 64  # the timed shapes' rope width, dtype and block size


class Shape(NamedTuple):
    """A timed problem: B sequences of S tokens, H heads, latent width R (Mistral Small 4's
    attention by default; 128 x 512 is DeepSeek-V3's, 16 and 8 heads a tensor-parallel shard's)."""

    B: int
    S: int
    H: int = 32
    R: int = 256

    @property
    def label(self) -> str:
        return f"{self.B}x{self.S}" + ("" if (self.H, self.R) == (32, 256) else f"x{self.H}x{self.R}")


SHAPES = "1x1024,1x8192,1x32768,16x8192,16x32768,64x8192,16x32768x16x256,16x32768x8x256,16x8192x128x512,1x32768x128x512"
QUICK_SHAPES = "1x1024,1x32768,16x8192"
REFERENCE_MAX_TOKENS = 16 * 8192  # the reference gathers the whole block table: not beyond
HBM = {"cuda": 3.35e12}  # bytes/s, H100 SXM datasheet
BEGIN, END = "<!-- section:kernel -->", "<!-- /section:kernel -->"


# ---- correctness -------------------------------------------------------------------------


class Checked(NamedTuple):
    ok: bool
    max_abs: float
    rel: float


def check(backend: str, case: Case, P: int = 64) -> Checked:
    """The kernel against the reference on one case: `out` and all four cache fields."""
    lens, H, R, dtype, gs = case.lens, case.H, case.R, case.dtype, case.group_size
    scale = 1.0 / math.sqrt(R + P)
    ctx = mx.array(lens, dtype=mx.int32)
    ref_cache, table = filled_cache(lens, R, P, dtype, group_size=gs)
    gpu_cache, _ = filled_cache(lens, R, P, dtype, group_size=gs)
    if case.poisoned:
        table = poison_table(table, ref_cache.num_blocks)
    args = decode_inputs(len(lens), H, R, P, dtype)
    ref = mla_decode_append(*args, ref_cache, table, ctx, scale, backend="reference")
    got = mla_decode_append_fused(backend, *args, gpu_cache, table, ctx, scale)
    mx.eval(ref, got, *ref_cache.arrays(), *gpu_cache.arrays())
    r, g = np.array(ref.astype(mx.float32)), np.array(got.astype(mx.float32))
    abs_err = float(np.abs(r - g).max())
    rel_err = float(np.linalg.norm(r - g) / max(float(np.linalg.norm(r)), 1e-30))
    same = {
        k: bool(mx.array_equal(a, b).item())
        for k, a, b in zip(("packed", "scales", "biases", "k_pe"), ref_cache.arrays(), gpu_cache.arrays(), strict=True)
    }
    tol = 2e-2 if dtype == mx.bfloat16 else 5e-3
    ok = bool(np.isfinite(g).all()) and rel_err < tol and all(same.values())
    print(
        f"{'ok ' if ok else 'BAD'} B={len(lens):2d} H={H:3d} R={R} gs={gs:3d} {str(dtype):14s} "
        f"max_len={max(lens):5d}{' bad-blocks' if case.poisoned else ''}  max_abs={abs_err:.2e} rel={rel_err:.2e}  "
        f"cache bytes equal: {same}"
    )
    return Checked(ok, abs_err, rel_err)


def memory(backend: str) -> bool:
    """A decode step on a large pool allocates nothing proportional to the pool."""
    R, P, dtype, B = 256, 64, mx.bfloat16, 4
    cache = random_pool(32768, 64, R, P, dtype)  # 2M tokens, ~570 MB
    table = contiguous_tables(B, 64)
    ctx = mx.array([100, 4000, 64, 2], mx.int32)
    args = decode_inputs(B, 32, R, P, dtype)
    mx.eval(*args)
    out = mla_decode_append_fused(backend, *args, cache, table, ctx, 0.05)
    mx.eval(out, *cache.arrays())
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out = mla_decode_append_fused(backend, *args, cache, table, ctx + 1, 0.05)
    mx.eval(out, *cache.arrays())
    grew = mx.get_peak_memory() - base
    ok = grew < cache.nbytes / 100
    print(
        f"{'ok ' if ok else 'BAD'} peak memory of a step over a {cache.nbytes / 1e6:.0f} MB pool: +{grew / 1e6:.2f} MB"
    )
    return ok


# ---- timings -----------------------------------------------------------------------------


def chain_time(step: Callable[[mx.array | None], mx.array], n: int = 50, runs: int = 5) -> float:
    """Seconds per call: n calls evaluated together, each `step(prev)` depending on the one
    before (MLX's CUDA graph would otherwise run independent calls concurrently)."""
    mx.eval(step(None))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = None
        for _ in range(n):
            out = step(out)
        mx.eval(out)
        times.append((time.perf_counter() - t) / n)
    return float(np.median(times))


def pool_problem(
    shape: Shape,
) -> tuple[LatentCache, mx.array, mx.array, tuple[mx.array, mx.array, mx.array, mx.array]]:
    """(cache, block table, context_lens, decode inputs): B sequences of S - 1 cached tokens."""
    B, S, H, R = shape
    max_blocks = S // BS + 1
    cache = random_pool(B * max_blocks, BS, R, P, DT)
    table = contiguous_tables(B, max_blocks)
    ctx = mx.full((B,), S - 1, mx.int32)
    args = decode_inputs(B, H, R, P, DT)
    mx.eval(*args)
    return cache, table, ctx, args


def fused_step(
    backend: str, shape: Shape, cfg: TileConfig | None = None
) -> tuple[Callable[[mx.array | None], mx.array], int, TileConfig]:
    """(one chained decode step, cache bytes it must read, tiles) of the fused kernel."""
    B, S, H, R = shape
    max_blocks = S // BS + 1
    cache, table, ctx, (ql, qp, nl, nk) = pool_problem(shape)

    def step(prev: mx.array | None) -> mx.array:  # chained through cache.last_out, as decode steps are
        return mla_decode_append_fused(backend, ql, qp, nl, nk, cache, table, ctx, 0.05, cfg)

    return step, S * B * cache.bytes_per_token, cfg or choose_config(backend, B, H, R, P, max_blocks, BS)


def fused_time(backend: str, shape: Shape, cfg: TileConfig | None = None) -> tuple[float, int, TileConfig]:
    """(seconds, cache bytes read, tiles) of the fused kernel."""
    step, nbytes, cfg = fused_step(backend, shape, cfg)
    return chain_time(step), nbytes, cfg


def gpu_times(step: Callable[[mx.array | None], mx.array], n: int = 20) -> dict[str, float] | None:
    """Seconds of GPU time per call of each kernel `step` launches, by kernel name: CUPTI's
    activity records (what Nsight Systems reads) through torch.profiler, so MLX's host work
    between launches is left out. None where torch or its CUDA profiler is missing."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    mx.eval(step(None))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = None
        for _ in range(n):
            out = step(out)
        mx.eval(out)
        mx.synchronize()
    times: dict[str, float] = {}
    for e in prof.key_averages():
        us = float(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) or 0)
        if us > 0:
            times[e.key] = times.get(e.key, 0.0) + us * 1e-6 / n
    return times or None


def reference_time(shape: Shape) -> float | None:
    """Seconds of the plain-MLX reference (the fallback), or None past REFERENCE_MAX_TOKENS."""
    if shape.B * shape.S > REFERENCE_MAX_TOKENS:
        return None
    cache, table, ctx, args = pool_problem(shape)

    def step(prev: mx.array | None) -> mx.array:  # chained through the cache fields it writes
        return mla_decode_append(*args, cache, table, ctx, 0.05, backend="reference")

    return chain_time(step)


def mlx_lm_time(shape: Shape) -> tuple[float, int]:
    """mlx-lm's decode: bf16 latent, SDPA with the rope scores as the additive mask."""
    B, S, H, R = shape
    k = mx.random.normal((B, 1, S, R)).astype(DT)
    k_pe = mx.random.normal((B, 1, S, P)).astype(DT)
    q = mx.random.normal((B, H, 1, R)).astype(DT)
    q_pe = mx.random.normal((B, H, 1, P)).astype(DT)
    mx.eval(k, k_pe, q, q_pe)
    scale = 1 / math.sqrt(R + P)

    def step(prev: mx.array | None) -> mx.array:
        qq = q if prev is None else q + 0 * prev[..., :1]
        pe = (q_pe * scale) @ k_pe.swapaxes(-1, -2)
        return mx.fast.scaled_dot_product_attention(qq, k, k, scale=scale, mask=pe)

    return chain_time(step), B * S * (R + P) * 2


def composed_time(shape: Shape) -> tuple[float, int]:
    """INT4 without fusion: dequantize, matmul, softmax, matmul (contiguous per sequence)."""
    B, S, H, R = shape
    lat = mx.random.normal((B, S, R)).astype(DT)
    wq, sc, bi = mx.quantize(lat, 64, 4)
    k_pe = mx.random.normal((B, S, P)).astype(DT)
    q = mx.random.normal((B, H, R)).astype(DT)
    q_pe = mx.random.normal((B, H, P)).astype(DT)
    mx.eval(wq, sc, bi, k_pe, q, q_pe)
    scale = 1 / math.sqrt(R + P)

    def step(prev: mx.array | None) -> mx.array:
        qq = q if prev is None else q + 0 * prev[..., :1]
        kv = mx.dequantize(wq, sc, bi, 64, 4)
        s = (qq @ kv.swapaxes(1, 2) + q_pe @ k_pe.swapaxes(1, 2)) * scale
        p = mx.softmax(s.astype(mx.float32), axis=-1).astype(DT)
        return p @ kv

    per_token = R // 2 + 2 * 2 * (R // 64) + 2 * P
    return chain_time(step), B * S * per_token


def sweep(backend: str, shape: Shape, t: float, cfg: TileConfig) -> tuple[float, TileConfig]:
    """Time tile variants at the default split, then splits around the best; keep the fastest."""
    max_blocks = shape.S // BS + 1

    def trial(c: TileConfig) -> None:
        nonlocal t, cfg
        tc, _, _ = fused_time(backend, shape, c)
        print(f"   sweep {shape.label} {c}: {tc * 1e3:.4f} ms", flush=True)
        if tc < t:
            t, cfg = tc, c

    base = cfg
    for tt, nstage in ((64, 2), (64, 3), (32, 3), (32, 4)):
        for nw in (8, 16):  # 4 warps never won on the H100
            c = TileConfig(base.hg, tt, nw, base.pps, nstage)
            if c != base:
                trial(c)
    best = cfg
    for mult in (0.5, 2):
        pps = max(1, min(max_blocks, round(best.pps * mult)))
        if pps != best.pps:
            trial(TileConfig(best.hg, best.tt, best.nw, pps, best.nstage))
    return t, cfg


class Row(NamedTuple):
    shape: Shape
    fused: float
    nbytes: int
    cfg: TileConfig
    reference: float | None
    mlx_lm: float
    composed: float
    gpu: float | None = None  # the fused launches' GPU time alone (CUPTI), when measurable


def timings(backend: str, shapes: list[Shape], do_sweep: bool) -> list[Row]:
    rows = []
    print("shape fused_ms tiles reference_ms mlx_lm_ms composed_ms")
    for shape in shapes:
        t, nbytes, cfg = fused_time(backend, shape)
        if do_sweep:
            t, cfg = sweep(backend, shape, t, cfg)
        kernels = gpu_times(fused_step(backend, shape, cfg)[0])
        if kernels:
            print("   GPU time per call:", ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in sorted(kernels.items())))
        gpu = sum(v for k, v in kernels.items() if "mla_decode" in k) if kernels else None
        row = Row(shape, t, nbytes, cfg, reference_time(shape), mlx_lm_time(shape)[0], composed_time(shape)[0], gpu)
        rows.append(row)
        ref = "-" if row.reference is None else f"{row.reference * 1e3:.4f}"
        print(
            shape.label, f"{t * 1e3:.4f}", cfg, ref, f"{row.mlx_lm * 1e3:.4f}", f"{row.composed * 1e3:.4f}", flush=True
        )
    return rows


def table(backend: str, rows: list[Row]) -> list[str]:
    peak = HBM.get(backend)

    def pct(nbytes: int, t: float | None) -> str:
        return f"{100 * nbytes / t / peak:.0f}%" if peak and t else "n/a"

    lines = [
        "| B | S | H | R | fused INT4 (ms) | GB/s | % HBM | GPU kernels (ms) | % HBM (GPU) | tiles (hg,tt,nw,pps,nstage) "
        "| mlx-lm bf16 (ms) | speed-up | composed INT4 (ms) | reference (ms) |",
        "|" + "---|" * 14,
    ]
    for r in rows:
        ref = "-" if r.reference is None else f"{r.reference * 1e3:.4f}"
        gpu = "-" if r.gpu is None else f"{r.gpu * 1e3:.4f}"
        lines.append(
            f"| {r.shape.B} | {r.shape.S} | {r.shape.H} | {r.shape.R} | {r.fused * 1e3:.4f} | {r.nbytes / r.fused / 1e9:.0f} | {pct(r.nbytes, r.fused)} | "
            f"{gpu} | {pct(r.nbytes, r.gpu)} | {r.cfg.hg},{r.cfg.tt},{r.cfg.nw},{r.cfg.pps},{r.cfg.nstage} | "
            f"{r.mlx_lm * 1e3:.4f} | {r.mlx_lm / r.fused:.1f}x | {r.composed * 1e3:.4f} | {ref} |"
        )
    return lines


def section(backend: str, lines: list[str], command: str) -> str:
    device = device_name(backend)
    return "\n".join(
        [
            "## Fused INT4 MLA decode kernel",
            "",
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {device}, `{command}`. "
            f"P={P}, bfloat16, block size {BS}; per layer and decode step. "
            "GB/s = cache bytes read / time; % HBM of 3.35 TB/s. Times are MLX end to end: N calls "
            "evaluated together, ours chained call to call through the cache as in a decode loop; "
            "GPU kernels: the fused launches' own GPU time per call (CUPTI through torch.profiler), "
            "without MLX's host work between launches. "
            "With --sweep, each row shows the fastest tiles found (defaults: server/kernels/tiles.py). "
            f"The reference (the fallback) is timed up to B x S = {REFERENCE_MAX_TOKENS}.",
            "",
            *lines,
        ]
    )


def read_section(path: Path) -> str:
    m = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), path.read_text(), re.S)
    if not m:
        raise SystemExit(f"no kernel section in {path}")
    return m.group(1)


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text}\n{END}"
    pat = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    new = pat.sub(lambda _: block, old) if pat.search(old) else old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


# ---- command line ------------------------------------------------------------------------


def shape_list(text: str) -> list[Shape]:
    """ "BxS[xHxR],...": H and R default to Mistral Small 4's 32 and 256."""
    try:
        values = [[int(v) for v in item.split("x")] for item in text.split(",")]
        if any(len(v) not in (2, 4) for v in values):
            raise ValueError(text)
        shapes = [Shape(*v) for v in values]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxS[xHxR][,...], got {text!r}") from None
    if not shapes or min(min(shape) for shape in shapes) < 1:
        raise argparse.ArgumentTypeError("B, S, H and R must be >= 1")
    return shapes


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m server.bench kernel",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[1:]),
    )
    ap.add_argument("--backend", choices=["metal", "cuda"], default=None, help="default: this device's")
    ap.add_argument("--no-check", action="store_true", help="timings only")
    ap.add_argument("--no-timings", action="store_true", help="the check only")
    ap.add_argument("--quick", action="store_true", help=f"fewer timing shapes ({QUICK_SHAPES})")
    ap.add_argument("--shapes", type=shape_list, default=None, help=f"BxS,... to time (default {SHAPES})")
    ap.add_argument("--sweep", action="store_true", help="also time tile variants per shape")
    ap.add_argument("--md", type=Path, default=None, help="write the timing table into this file's kernel section")
    ap.add_argument("--merge", type=Path, default=None, help="copy the kernel section of this file into --md, and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser()
    a = ap.parse_args(args_list)
    if a.merge:
        if a.md is None:
            ap.error("--merge needs --md, the file to copy the section into")
        write_section(a.md, read_section(a.merge))
        return 0
    if a.md is not None and a.no_timings:
        ap.error("--md writes the timing table: drop --no-timings")
    backend = a.backend or current_platform().defaults.decode_backend
    if backend not in FUSED:  # "cpu": plain MLX, which the tests check
        print(
            f"no fused kernel on this machine (MLX default device: {current_platform().backend}; decode runs through"
            f" the plain-MLX {backend!r} backend, checked against the reference by tests/kernels/test_kernel_cpu.py); "
            "nothing to check or time"
        )
        return 1 if a.md is not None else 0
    print(f"backend {device_name(backend)}")
    ok = True
    checked: list[Checked] = []
    rows: list[Row] = []
    if not a.no_check:
        checked = [check(backend, c) for c in CHECKS]
        ok = all(c.ok for c in checked)
        ok = memory(backend) and ok
    if not a.no_timings:
        shapes = a.shapes or shape_list(QUICK_SHAPES if a.quick else SHAPES)
        rows = timings(backend, shapes, a.sweep)
        lines = table(backend, rows)
        print("\n".join(lines))
        if a.md is not None:
            command = " ".join(["python -m server.bench kernel", *map(shlex.quote, args_list)])
            write_section(a.md, section(backend, lines, command))
    if not a.no_check:
        print("PASS" if ok else "FAIL")
    print(report_line(backend, ok, checked, rows))
    return 0 if ok else 1


def device_name(backend: str) -> str:
    """`cuda: NVIDIA H100 80GB HBM3`: the backend and the device it runs on."""
    platform = current_platform()
    return f"{backend}: {platform.device_name or platform.backend}"


def report_line(backend: str, ok: bool, checked: list[Checked], rows: list[Row]) -> str:
    """One line to paste into a bug report: device, MLX, verdict, worst error, time per shape."""
    verdict = "not-checked" if not checked else ("PASS" if ok else "FAIL")
    worst = (
        f"worst max_abs={max(c.max_abs for c in checked):.2e} rel={max(c.rel for c in checked):.2e}" if checked else ""
    )
    times = " ".join(f"{r.shape.label}={r.fused * 1e6:.0f}us" for r in rows)
    parts = [
        f"mla-kernel-report: {device_name(backend)}",
        f"mlx {getattr(mx, '__version__', '?')}",
        verdict,
        worst,
        times,
    ]
    return " | ".join(p for p in parts if p)


if __name__ == "__main__":
    sys.exit(main())
