"""Benchmark the fused INT4 MLA decode kernel against mlx-lm's decode path and the composed
INT4 path, on this machine's GPU (H=32, R=256, P=64 bf16: Mistral Small 4's attention).

    python scripts/bench_kernel.py [--md docs/benchmarks.md] [--sweep] [--shapes 1x1024,16x32768]
    python scripts/bench_kernel.py --merge OTHER.md   # copy our section from OTHER.md into --md

Each time is the median over 5 runs of (N chained calls evaluated together) / N. GB/s counts the cache bytes each path must
read (INT4 latent + scales/biases + bf16 rope key for ours; bf16 latent + rope key for mlx-lm).
"""

from __future__ import annotations

import argparse
import datetime
import math
import re
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.kernels.cases import contiguous_tables, decode_inputs, random_pool  # noqa: E402
from server.kernels.fused import TileConfig, choose_config, mla_decode_append_fused  # noqa: E402
from server.kernels.mla_decode import default_backend  # noqa: E402

H, R, P, DT, BS = 32, 256, 64, mx.bfloat16, 64
HBM = {"cuda": 3.35e12}  # bytes/s, H100 SXM datasheet
BEGIN, END = "<!-- section:kernel -->", "<!-- /section:kernel -->"


def chain_time(step, n: int = 50, runs: int = 5) -> float:
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


def fused_time(backend, B, S, cfg=None):
    max_blocks = S // BS + 1
    cache = random_pool(B * max_blocks, BS, R, P, DT)
    table = contiguous_tables(B, max_blocks)
    ctx = mx.full((B,), S - 1, mx.int32)
    ql, qp, nl, nk = decode_inputs(B, H, R, P, DT)
    mx.eval(ql, qp, nl, nk)

    def step(prev):  # chained through cache.last_out, as successive decode steps are
        return mla_decode_append_fused(backend, ql, qp, nl, nk, cache, table, ctx, 0.05, cfg)

    cfg = cfg or choose_config(backend, B, H, R, P, max_blocks, BS)
    return chain_time(step), S * B * cache.bytes_per_token, cfg


def mlx_lm_time(B, S):
    """mlx-lm's decode: bf16 latent, SDPA with the rope scores as the additive mask."""
    k = mx.random.normal((B, 1, S, R)).astype(DT)
    k_pe = mx.random.normal((B, 1, S, P)).astype(DT)
    q = mx.random.normal((B, H, 1, R)).astype(DT)
    q_pe = mx.random.normal((B, H, 1, P)).astype(DT)
    mx.eval(k, k_pe, q, q_pe)
    scale = 1 / math.sqrt(R + P)

    def step(prev):
        qq = q if prev is None else q + 0 * prev[..., :1]
        pe = (q_pe * scale) @ k_pe.swapaxes(-1, -2)
        return mx.fast.scaled_dot_product_attention(qq, k, k, scale=scale, mask=pe)

    return chain_time(step), B * S * (R + P) * 2


def composed_time(B, S):
    """INT4 without fusion: dequantize, matmul, softmax, matmul (contiguous per sequence)."""
    lat = mx.random.normal((B, S, R)).astype(DT)
    wq, sc, bi = mx.quantize(lat, 64, 4)
    k_pe = mx.random.normal((B, S, P)).astype(DT)
    q = mx.random.normal((B, H, R)).astype(DT)
    q_pe = mx.random.normal((B, H, P)).astype(DT)
    mx.eval(wq, sc, bi, k_pe, q, q_pe)
    scale = 1 / math.sqrt(R + P)

    def step(prev):
        qq = q if prev is None else q + 0 * prev[..., :1]
        kv = mx.dequantize(wq, sc, bi, 64, 4)
        s = (qq @ kv.swapaxes(1, 2) + q_pe @ k_pe.swapaxes(1, 2)) * scale
        p = mx.softmax(s.astype(mx.float32), axis=-1).astype(DT)
        return p @ kv

    per_token = R // 2 + 2 * 2 * (R // 64) + 2 * P
    return chain_time(step), B * S * per_token


def sweep(backend, B, S, t, cfg):
    """Time tile variants at the default split, then splits around the best; keep the fastest."""
    max_blocks = S // BS + 1

    def trial(c):
        nonlocal t, cfg
        tc, _, _ = fused_time(backend, B, S, c)
        print(f"   sweep B={B} S={S} {c}: {tc * 1e3:.4f} ms", flush=True)
        if tc < t:
            t, cfg = tc, c

    base = cfg
    for tt in (32, 64):
        for nw in (8, 16):  # 4 warps never won on the H100
            c = TileConfig(base.hg, tt, nw, base.pps)
            if c != base:
                trial(c)
    best = cfg
    for mult in (0.5, 2):
        pps = max(1, min(max_blocks, round(best.pps * mult)))
        if pps != best.pps:
            trial(TileConfig(best.hg, best.tt, best.nw, pps))
    return t, cfg


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--md", default="docs/benchmarks.md", help="file whose kernel section to write")
    ap.add_argument("--merge", help="copy the kernel section of this file into --md and exit")
    ap.add_argument("--sweep", action="store_true", help="also time tile variants per shape")
    ap.add_argument("--shapes", default="1x1024,1x8192,1x32768,16x8192,16x32768")
    a = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    md = Path(a.md)
    if a.merge:
        write_section(md, read_section(Path(a.merge)))
        return 0
    backend = default_backend()
    if backend == "reference":
        print("no GPU: nothing to benchmark")
        return 1
    peak = HBM.get(backend)
    results = []
    print("B S fused_ms tiles mlx_lm_ms composed_ms")
    for B, S in shapes:
        t, nbytes, cfg = fused_time(backend, B, S)
        if a.sweep:
            t, cfg = sweep(backend, B, S, t, cfg)
        tl, _ = mlx_lm_time(B, S)
        tcmp, _ = composed_time(B, S)
        results.append((B, S, t, nbytes, cfg, tl, tcmp))
        print(B, S, f"{t * 1e3:.4f}", cfg, f"{tl * 1e3:.4f}", f"{tcmp * 1e3:.4f}", flush=True)
    pct = lambda nbytes, t: f"{100 * nbytes / t / peak:.0f}%" if peak else "n/a"  # noqa: E731
    head = ("| B | S | fused INT4 (ms) | GB/s | % HBM | tiles (hg,tt,nw,pps) | mlx-lm bf16 (ms) "
            "| speed-up | composed INT4 (ms) |")
    rows = []
    for B, S, t, nbytes, cfg, tl, tcmp in results:
        rows.append(f"| {B} | {S} | {t * 1e3:.4f} | {nbytes / t / 1e9:.0f} | {pct(nbytes, t)} | "
                    f"{cfg.hg},{cfg.tt},{cfg.nw},{cfg.pps} | {tl * 1e3:.4f} | {tl / t:.1f}x | "
                    f"{tcmp * 1e3:.4f} |")
    print("\n".join([head, *rows]))
    try:
        device = f"{backend}: {mx.device_info().get('device_name', mx.default_device())}"
    except Exception:  # device_info is not on every backend of every MLX
        device = f"{backend}: {mx.default_device()}"
    text = "\n".join([
        "## Fused INT4 MLA decode kernel", "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {device}, "
        f"`python scripts/bench_kernel.py{' --sweep' if a.sweep else ''} --shapes {a.shapes}`. "
        f"H={H}, R={R}, P={P}, bfloat16, block size {BS}; per layer and decode step. "
        "GB/s = cache bytes read / time; % HBM of 3.35 TB/s. Times are MLX end to end: N calls "
        "evaluated together, ours chained call to call through the cache as in a decode loop. "
        "With --sweep, each row shows the fastest tiles found (defaults: server/kernels/fused.py).",
        "", head, "|" + "---|" * 9, *rows])
    write_section(md, text)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
