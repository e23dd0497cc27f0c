"""Tile sizes and split-K for the fused decode kernel, and which shapes it covers (host side).

Nothing here touches the GPU: `choose_config` picks a `TileConfig` from the problem's shape,
`unsupported_reason` says why a shape cannot run (the caller then falls back to the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from .latent_cache import LatentCache

# Threadgroup memory per threadgroup; Apple GPUs have 32 KB.
SMEM_LIMIT = {"cuda": 200 * 1024, "metal": 32 * 1024}
# Threadgroups wanted (one wave: about 2 per H100 SM) and the fewest cache blocks per split
# (fewer make the combine pass cost more than it saves). Set from the H100 sweeps behind
# docs/benchmarks.md; Metal's are guesses.
TARGET_GROUPS = {"cuda": 264, "metal": 128}
MIN_PPS = 4
COMBINE_WARPS = 8


@dataclass(frozen=True)
class TileConfig:
    hg: int  # heads per threadgroup (multiple of 16; padded heads are zero rows)
    tt: int  # tokens per tile
    nw: int  # warps per threadgroup
    pps: int  # cache blocks per split (a runtime value: changing it compiles nothing)
    nstage: int = 2  # raw tiles in the shared-memory ring: loads run nstage - 1 tiles ahead
    # Queries held in threadgroup memory; False: every score step reads them from device memory
    # (Metal only, where R=512 does not fit 32 KB otherwise).
    q_shared: bool = True

    def smem_bytes(self, R: int, P: int, group_size: int) -> int:
        """Threadgroup memory, as mla_body.PARTIAL lays it out (halves are 2 bytes)."""
        K = R + P
        queries = self.hg * (K + 8) if self.q_shared else 0
        halves = queries + self.tt * (R + 8) + self.hg * (self.tt + 8) + K
        stage = self.tt * R // 2 + 4 * self.tt * (R // group_size) + 2 * self.tt * (P + 8)
        floats = self.hg * (self.tt + 8) + 3 * self.hg + R
        return 2 * halves + self.nstage * stage + 4 * floats

    def defines(self) -> tuple[tuple[str, int], ...]:
        """The #defines these tiles add to the partial launches' text: none for the usual tiles
        (an undefined MLA_Q_FROM_DEVICE is 0 to the preprocessor), so their text stays the one
        measured and checked on the H100 and the launch is not rebuilt at every call."""
        return () if self.q_shared else (("MLA_Q_FROM_DEVICE", 1),)


def combine_smem_bytes(R: int) -> int:
    """Threadgroup memory of the combine launch: each warp's partial sum of the R columns."""
    return 4 * COMBINE_WARPS * R


def default_tiles(backend: str, H: int, R: int, block_size: int) -> tuple[int, int, int]:
    """(hg, tt, nstage) by measurement on the H100 (see docs/kernels.md); small tiles for Metal.
    R=512 takes 32-token tiles (H=128, B=16, S=8K: 425 us of GPU time against 507 with 64)."""
    hp = 16 * math.ceil(H / 16)
    if backend == "metal":
        return 16, 16, 2
    widest = 32 if R >= 512 else 64
    tt = next(t for t in (64, 32, 16) if t <= widest and block_size % t == 0)
    return min(hp, 32), tt, 2


def choose_config(
    backend: str,
    B: int,
    H: int,
    R: int,
    P: int,
    max_blocks: int,
    block_size: int,
    hg: int | None = None,
    tt: int | None = None,
    nw: int | None = None,
    pps: int | None = None,
    nstage: int | None = None,
    group_size: int = 64,
) -> TileConfig:
    """`max_blocks` is the block table's real width (no rounding): the splits divide it so that
    about TARGET_GROUPS threadgroups have tokens, in one wave. On Metal, tiles that would pass its
    32 KB of threadgroup memory drop to one stage (Metal's copies are synchronous: a second stage
    prefetches nothing there), then take the queries from device memory (R=512: 54.8 KB -> 47.9
    -> 29.2 KB at 16 heads and 16 tokens)."""
    d_hg, d_tt, d_ns = default_tiles(backend, H, R, block_size)
    hg, tt, nstage = hg or d_hg, tt or d_tt, nstage or d_ns
    groups = B * math.ceil(H / hg)
    if pps is None:
        splits = max(1, TARGET_GROUPS[backend] // groups)
        pps = max(MIN_PPS, math.ceil(max_blocks / splits))
    pps = max(1, min(pps, max_blocks))
    # 2026-11-27 H100 sweep: 8 warps won at B=16 and B=64; at B=1 S=32K, 8 warps with these
    # tiles (151 us) beat 16 (168 us); 16 warps with 32-token tiles and 4 stages (143 us) was
    # within the run's noise of it.
    if nw is None:
        nw = 4 if backend == "metal" else 8
    cfg = TileConfig(hg, tt, nw, pps, nstage)
    if backend == "metal":
        for smaller in (TileConfig(hg, tt, nw, pps, 1), TileConfig(hg, tt, nw, pps, 1, q_shared=False)):
            if cfg.smem_bytes(R, P, group_size) <= SMEM_LIMIT[backend]:
                break
            cfg = smaller
    return cfg


def unsupported_reason(backend: str, cache: LatentCache, cfg: TileConfig) -> str | None:
    """Why this kernel cannot run the shape (None if it can)."""
    R, P = cache.R, cache.P
    if cache.dtype not in (mx.float16, mx.bfloat16):
        return f"dtype {cache.dtype} (the kernel is for float16 and bfloat16)"
    if R % 32 or P % 16 or cache.group_size not in (32, 64, 128):
        return f"R={R}, P={P}, group_size={cache.group_size}"
    if cfg.hg % 16 or cfg.tt % 16 or cache.block_size % cfg.tt:
        return f"tiles {cfg} with block_size={cache.block_size}"
    if (R // 8) % cfg.nw or cfg.nw % (cfg.hg // 16):
        return f"{cfg.nw} warps cannot split R/8={R // 8} column tiles and {cfg.hg // 16} head tiles"
    if cfg.nstage < 1:
        return f"nstage={cfg.nstage} (the ring needs a stage)"
    if not cfg.q_shared and backend != "metal":
        return "queries from device memory (only the Metal dialect has load_a_q)"
    smem = cfg.smem_bytes(R, P, cache.group_size)
    if smem > SMEM_LIMIT[backend]:
        return f"{smem} bytes of threadgroup memory > {SMEM_LIMIT[backend]}"
    return None
