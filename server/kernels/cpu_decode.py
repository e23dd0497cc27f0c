"""`mla_decode_append` on MLX's CPU backend: the reference's semantics, the INT4 codes kept packed.

Why it exists: on the CPU the reference (`reference.py`, the oracle) spends most of a decode step
turning the gathered block table into a float32 latent, B * T * R floats through `mx.dequantize`,
too big for the caches at 16+ sequences, then multiplying with it. Here only the raw rows are
gathered (the INT4 codes are R / 2 bytes a token; scales and biases widened to float32, R / GS
each) and MLX's quantized matmul dequantizes on the fly: `p @ latent` always, and the scores
`q_latent . latent` for up to `DEQUANT_FROM_HEADS - 1` heads. MLX's CPU transposed quantized
matmul dequantizes each code once per query row, so with many heads the scores are cheaper as one
float32 dequantization (in the codes' transposed layout) and a plain matmul. Everything else is
the reference's: the same append (`append_slots`, `append_guarded`), the same mask (positions
past context_lens, block ids outside the pool), the same zeros for a row with no token, float32
arithmetic throughout. It is checked against the reference in tests/kernels/test_kernel_cpu.py. Its
memory, like the reference's, grows with B * max_blocks * block_size, never with the pool: the
scales are widened after the gather, not before (`mx.gather_qmm` over the pool would widen every
block's scales at every step).

Shapes (B sequences, H heads, R latent width, P rope width, GS quant group, T = max_blocks * BS):

    q_latent      [B, H, R]      -> float32
    q_pe          [B, H, P]      -> float32
    codes         uint32 [B, T, R / 8]   the block table's rows of cache.packed
    scales, biases float32 [B, T, R / GS]
    k_pe          float32 [B, T, P]
    valid         bool [B, T]    cached tokens plus the new one, in pool blocks
    scores, p     float32 [B, H, T]
    -> out        [B, H, R]      in cache.dtype
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import mlx.core as mx

from .cpu_streams import num_cpu_streams, run_parts
from .latent_cache import BITS, LatentCache
from .reference import append_guarded, append_slots, attended

# From this many heads on, the scores dequantize the codes once instead of once per head.
DEQUANT_FROM_HEADS = 8
# Fewest sequences worth a CPU stream of their own. Measured on 2 cores (demo shape, 1K contexts):
# attention alone B=16 and 64 1.8x faster on two streams; whole decode steps B=16 1.3x, B=64 1.5x,
# B=4 (two parts of 2) 0.93x: too little work per stream.
SPLIT_MIN_SEQS = 4
CHUNK_FLOATS = 1 << 18  # float32 latent per scores chunk: 1 MB, a few sequences, stays in cache


def mla_decode_append_cpu(
    q_latent: mx.array,
    q_pe: mx.array,
    new_latent: mx.array,
    new_kpe: mx.array,
    cache: LatentCache,
    block_table: mx.array,
    context_lens: mx.array,
    scale: float,
) -> mx.array:
    """Shapes as `mla_decode.mla_decode_append`; returns out [B, H, R] in the cache dtype.

    The append runs first, once; then the sequences attend in `cpu_streams.num_cpu_streams()`
    parts of at least `SPLIT_MIN_SEQS` each, one CPU stream (core) per part."""
    B = q_latent.shape[0]
    context_lens = context_lens.astype(mx.int32)
    block_table = block_table.astype(mx.int32)
    append_guarded(cache, *append_slots(cache, block_table, context_lens), new_latent, new_kpe)
    n = max(1, min(num_cpu_streams(), B // SPLIT_MIN_SEQS))
    bounds = [B * i // n for i in range(n + 1)]

    def part(a: int, b: int) -> Callable[[], mx.array]:
        return lambda: _attend(q_latent[a:b], q_pe[a:b], cache, block_table[a:b], context_lens[a:b], scale)

    outs = run_parts([part(a, b) for a, b in itertools.pairwise(bounds)])
    return mx.concatenate(outs) if len(outs) > 1 else outs[0]


def _attend(
    q_latent: mx.array,
    q_pe: mx.array,
    cache: LatentCache,
    block_table: mx.array,
    context_lens: mx.array,
    scale: float,
) -> mx.array:
    """The attention of `mla_decode_append_cpu` over the cache after the append."""
    B, H, R = q_latent.shape
    bs, gs = cache.block_size, cache.group_size

    bt = mx.clip(block_table, 0, cache.num_blocks - 1)  # padding and bad ids: read, then masked
    T = bt.shape[1] * bs

    def rows(a: mx.array) -> mx.array:
        return a[bt].reshape(B, T, a.shape[-1])

    codes = rows(cache.packed)
    scales = rows(cache.scales).astype(mx.float32)
    biases = rows(cache.biases).astype(mx.float32)
    k_pe_t = rows(cache.k_pe).astype(mx.float32).swapaxes(1, 2)  # [B, P, T]

    q = q_latent.astype(mx.float32)
    if H < DEQUANT_FROM_HEADS:
        scores = mx.quantized_matmul(q, codes, scales, biases, transpose=True, group_size=gs, bits=BITS)
    else:
        step = max(1, CHUNK_FLOATS // (T * R))
        parts = []
        for i in range(0, B, step):
            c = slice(i, i + step)
            # [b, R, T] contiguous: a matmul whose long dimension (T) is the contiguous one.
            latent_t = mx.contiguous(mx.dequantize(codes[c], scales[c], biases[c], gs, BITS).swapaxes(1, 2))
            parts.append(q[c] @ latent_t)
        scores = mx.concatenate(parts) if len(parts) > 1 else parts[0]
    scores = (scores + q_pe.astype(mx.float32) @ mx.contiguous(k_pe_t)) * scale
    valid = attended(cache, block_table, context_lens)
    scores = mx.where(valid[:, None, :], scores, -mx.inf)
    p = mx.softmax(scores, axis=-1)
    out = mx.quantized_matmul(p, codes, scales, biases, transpose=False, group_size=gs, bits=BITS)
    return mx.where(valid.any(axis=1)[:, None, None], out, 0.0).astype(cache.dtype)
