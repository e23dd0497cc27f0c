"""The decode step in plain MLX ops: the semantics every fused kernel must match.

Vectorized over the batch (no loop over sequences). It gathers the whole block table width, so
its memory grows with `max_blocks * block_size`, never with the pool.
"""

from __future__ import annotations

import mlx.core as mx

from .latent_cache import BITS, LatentCache


def append_slots(cache: LatentCache, block_table: mx.array, context_lens: mx.array) -> mx.array:
    """int32 [B]: the slot of each sequence's new token (position context_lens[b])."""
    bs = cache.block_size
    blk = mx.take_along_axis(block_table, (context_lens // bs)[:, None], axis=1)[:, 0]
    return blk * bs + context_lens % bs


def mla_decode_append_reference(
    q_latent: mx.array,
    q_pe: mx.array,
    new_latent: mx.array,
    new_kpe: mx.array,
    cache: LatentCache,
    block_table: mx.array,
    context_lens: mx.array,
    scale: float,
) -> mx.array:
    """Shapes as `mla_decode.mla_decode_append`; returns out [B, H, R] in the cache dtype."""
    B, H, R = q_latent.shape
    bs = cache.block_size
    context_lens = context_lens.astype(mx.int32)
    block_table = block_table.astype(mx.int32)
    cache.write(append_slots(cache, block_table, context_lens), new_latent, new_kpe)

    # Padding entries of the block table may hold any value; they are masked below.
    bt = mx.clip(block_table, 0, cache.num_blocks - 1)
    T = bt.shape[1] * bs

    def rows(a: mx.array) -> mx.array:
        return a[bt].reshape(B, T, a.shape[-1])

    latent = (
        mx.dequantize(rows(cache.packed), rows(cache.scales), rows(cache.biases), cache.group_size, BITS)
        .astype(cache.dtype)
        .astype(mx.float32)
    )
    k_pe = rows(cache.k_pe).astype(mx.float32)

    scores = q_latent.astype(mx.float32) @ latent.swapaxes(1, 2)
    scores = scores + q_pe.astype(mx.float32) @ k_pe.swapaxes(1, 2)
    scores = scores * scale
    valid = mx.arange(T)[None, :] <= context_lens[:, None]  # cached tokens plus the new one
    scores = mx.where(valid[:, None, :], scores, -mx.inf)
    p = mx.softmax(scores, axis=-1)
    return (p @ latent).astype(cache.dtype)
