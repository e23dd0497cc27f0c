"""Launching the fused kernel (Metal or CUDA) through `mx.fast.{metal,cuda}_kernel`.

In-place append: the kernel writes the new token's bytes straight into the cache's `packed`,
`scales`, `biases` and `k_pe` buffers, which it receives as *inputs* (MLX does not know about
that write). It is correct because of these invariants, kept here and by the engine:

1. No copy reaches the kernel: each field must be row-contiguous, since MLX hands a custom
   kernel a row-contiguous input as is and copies any other (`ensure_row_contiguous=True`,
   which also makes the query inputs contiguous for free); a write into such a temporary copy
   would be lost. LatentCache only ever holds row-contiguous fields (zeros, scatter results,
   `mx.depends` views of those); never set a field to a slice, transpose or broadcast. The
   self-test checks on the GPU that the appended bytes land in the cache and that a step's
   peak memory does not grow with the pool.
2. Ordering, at two levels. MLX's graph: after the launch each field is replaced by
   `mx.depends(field, out)`, the same buffer with a dependency on the kernel, so anything
   built later from `cache.packed` (etc.) is scheduled after the write, and evaluating the
   fields (the engine calls `mx.eval(*cache.arrays())` after each step) runs the step. The
   GPU: within one evaluation MLX's CUDA graph (and Metal's barriers) order a kernel only
   after the kernels that *output* the buffers it touches, and the append is not an output.
   So each call also takes the previous call's `out` (`cache.last_out`) as an input, which
   chains successive decode steps on one cache; any other reader or writer of the fields
   (prefill's `write`/`read`) must be evaluated in a later `mx.eval` than the decode step.
   Read the fields from the cache at the time of use; never keep an old field array.
3. Ownership: the block that holds position context_lens[b] belongs to sequence b alone (a
   shared prefix block is always full), so no other threadgroup reads the bytes being written.
4. Memory: a step allocates `out` and, with split-K, partials of B * NSPLIT * H * (R + 2)
   floats: nothing proportional to the pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx

from . import codegen, mla_body
from .latent_cache import LatentCache

# Threadgroup memory per threadgroup; Apple GPUs have 32 KB.
SMEM_LIMIT = {"cuda": 200 * 1024, "metal": 32 * 1024}
# Threadgroups wanted (the kernel is latency-bound: about 2 per H100 SM did best), the fewest
# cache blocks per split (fewer make the combine pass cost more than it saves), and the SM count
# under which a threadgroup gets 16 warps instead of 8 (a long single sequence then has more
# warps per split). Set from the H100 sweeps behind docs/benchmarks.md; Metal's are guesses.
TARGET_GROUPS = {"cuda": 264, "metal": 128}
MIN_PPS = 8
SM_COUNT = {"cuda": 132, "metal": 0}
COMBINE_WARPS = 4


@dataclass(frozen=True)
class TileConfig:
    hg: int   # heads per threadgroup (multiple of 16; padded heads are zero rows)
    tt: int   # tokens per tile
    nw: int   # warps per threadgroup
    pps: int  # cache blocks per split

    def smem_bytes(self, R: int, P: int) -> int:
        K = R + P
        halves = (self.hg + self.tt) * (K + 8) + self.hg * (self.tt + 8) + K
        floats = self.hg * (self.tt + 8) + 3 * self.hg + R
        return 2 * halves + 4 * floats


def bucket(n: int) -> int:
    """The next power of two. PPS, MAXB and NSPLIT are template constants, and the runtime
    compiler builds one kernel per distinct set: a serving engine whose batch size and longest
    context change every step would otherwise compile a kernel every step."""
    return 1 << max(0, n - 1).bit_length()


def default_tiles(backend: str, H: int, block_size: int) -> tuple[int, int]:
    """(hg, tt) by measurement on the H100 (see docs/kernels.md); small tiles for Metal."""
    hp = 16 * math.ceil(H / 16)
    if backend == "metal":
        return 16, 16
    tt = 64 if block_size % 64 == 0 else (32 if block_size % 32 == 0 else 16)
    return min(hp, 32), tt


def choose_config(backend: str, B: int, H: int, R: int, P: int, max_blocks: int,
                  block_size: int, hg: int | None = None, tt: int | None = None,
                  nw: int | None = None, pps: int | None = None) -> TileConfig:
    d_hg, d_tt = default_tiles(backend, H, block_size)
    hg, tt = hg or d_hg, tt or d_tt
    groups = B * math.ceil(H / hg)
    if pps is None:
        splits = max(1, math.ceil(TARGET_GROUPS[backend] / groups))
        pps = bucket(max(MIN_PPS, math.ceil(max_blocks / splits)))
    pps = min(pps, max_blocks)
    if nw is None:
        few = groups * math.ceil(max_blocks / pps) < SM_COUNT[backend]
        nw = 4 if backend == "metal" else (16 if few else 8)
    return TileConfig(hg, tt, nw, pps)


def unsupported_reason(backend: str, cache: LatentCache, cfg: TileConfig) -> str | None:
    """Why this kernel cannot run the shape (None if it can)."""
    R, P = cache.R, cache.P
    if cache.dtype not in (mx.float16, mx.bfloat16):
        return f"dtype {cache.dtype} (the kernel is for float16 and bfloat16)"
    if R % 32 or P % 8 or (R + P) % 16 or cache.group_size not in (32, 64, 128):
        return f"R={R}, P={P}, group_size={cache.group_size}"
    if cfg.hg % 16 or cfg.tt % 16 or cache.block_size % cfg.tt:
        return f"tiles {cfg} with block_size={cache.block_size}"
    if (R // 8) % cfg.nw or cfg.nw % (cfg.hg // 16):
        return f"{cfg.nw} warps cannot split R/8={R // 8} column tiles and {cfg.hg // 16} head tiles"
    if cfg.smem_bytes(R, P) > SMEM_LIMIT[backend]:
        return f"{cfg.smem_bytes(R, P)} bytes of threadgroup memory > {SMEM_LIMIT[backend]}"
    return None


@lru_cache(maxsize=64)
def _scalar(value: float, dtype: mx.Dtype = mx.float32) -> mx.array:
    """[1], cached: a decode loop passes the same scale at every step."""
    return mx.array([value], dtype)


@lru_cache(maxsize=None)
def _kernel(backend: str, kind: str, smem: int):
    """kind: 'direct' (one split, writes out), 'split' (writes partials) or 'combine'."""
    inputs = ["q_latent", "q_pe", "new_latent", "new_kpe", "packed", "scales", "biases", "k_pe",
              "block_table", "context_lens", "params", "after"]
    if kind == "combine":
        body, inputs, outputs = mla_body.COMBINE, ["o_part", "ml_part", "context_lens"], ["out"]
        defines = {}
    else:
        body = mla_body.PARTIAL
        outputs = ["out"] if kind == "direct" else ["o_part", "ml_part"]
        defines = {"MLA_DIRECT": int(kind == "direct")}
    header, source = codegen.render(backend, body, defines)
    name = f"mla_decode_{kind}"
    if backend == "cuda":
        return mx.fast.cuda_kernel(name=name, input_names=inputs, output_names=outputs,
                                   source=source, header=header, ensure_row_contiguous=True,
                                   shared_memory=smem)
    return mx.fast.metal_kernel(name=name, input_names=inputs, output_names=outputs,
                                source=source, header=header, ensure_row_contiguous=True)


def mla_decode_append_fused(backend: str, q_latent: mx.array, q_pe: mx.array,
                            new_latent: mx.array, new_kpe: mx.array, cache: LatentCache,
                            block_table: mx.array, context_lens: mx.array, scale: float,
                            cfg: TileConfig | None = None) -> mx.array:
    """Shapes as `mla_decode.mla_decode_append`; `cfg` overrides the tiles (benchmarks)."""
    B, H, R = q_latent.shape
    P = cache.P
    max_blocks = bucket(block_table.shape[1])
    if max_blocks > block_table.shape[1]:
        block_table = mx.pad(block_table, [(0, 0), (0, max_blocks - block_table.shape[1])])
    cfg = cfg or choose_config(backend, B, H, R, P, max_blocks, cache.block_size)
    reason = unsupported_reason(backend, cache, cfg)
    if reason:
        raise NotImplementedError(f"{backend} MLA decode kernel: {reason}")
    nsplit = math.ceil(max_blocks / cfg.pps)
    smem = cfg.smem_bytes(R, P)
    dt = cache.dtype
    fields = cache.arrays()
    inputs = [q_latent.astype(dt), q_pe.astype(dt), new_latent.astype(dt), new_kpe.astype(dt),
              *fields, block_table.astype(mx.int32), context_lens.astype(mx.int32),
              _scalar(scale), cache.last_out if cache.last_out is not None else _scalar(0.0, dt)]
    template = [("T", dt), ("H", H), ("HG", cfg.hg), ("R", R), ("P", P),
                ("GS", cache.group_size), ("BS", cache.block_size), ("TT", cfg.tt),
                ("PPS", cfg.pps), ("NW", cfg.nw), ("MAXB", max_blocks), ("NSPLIT", nsplit),
                ("SMEM_BYTES", smem)]
    nt = 32 * cfg.nw
    grid = (nsplit * nt, B * math.ceil(H / cfg.hg), 1)
    if nsplit == 1:
        (out,) = _kernel(backend, "direct", smem)(
            inputs=inputs, template=template, grid=grid, threadgroup=(nt, 1, 1),
            output_shapes=[(B, H, R)], output_dtypes=[dt])
    else:
        o_part, ml_part = _kernel(backend, "split", smem)(
            inputs=inputs, template=template, grid=grid, threadgroup=(nt, 1, 1),
            output_shapes=[(B, nsplit, H, R), (B, nsplit, H, 2)],
            output_dtypes=[mx.float32, mx.float32])
        nt_c = 32 * COMBINE_WARPS
        (out,) = _kernel(backend, "combine", 0)(
            inputs=[o_part, ml_part, inputs[9]],
            template=[("T", dt), ("H", H), ("R", R), ("BS", cache.block_size),
                      ("PPS", cfg.pps), ("NSPLIT", nsplit), ("NW", COMBINE_WARPS)],
            grid=(nt_c, B * H, 1), threadgroup=(nt_c, 1, 1),
            output_shapes=[(B, H, R)], output_dtypes=[dt])
    cache.packed, cache.scales, cache.biases, cache.k_pe = mx.depends(fields, [out])
    cache.last_out = out
    return out
