"""The decode step in plain MLX ops: the semantics every fused kernel must match.

Vectorized over the batch (no loop over sequences). It gathers the whole block table width, so
its memory grows with `max_blocks * block_size`, never with the pool.

A block-table entry outside [0, num_blocks) is clamped for the gather (never an out-of-bounds
read) and its tokens are masked. An append into such a block repeats the first valid sequence's
append instead (same slot, same bytes: never an out-of-bounds write, and no read of the old
bytes, which would cost MLX's scatter its in-place update). One difference from the fused
kernels, which drop such an append: when no sequence of the step appends validly, sequence 0's
token lands in its clamped slot (block 0 or num_blocks - 1).
"""

from __future__ import annotations

import mlx.core as mx

from .latent_cache import BITS, LatentCache


def in_pool(cache: LatentCache, block_ids: mx.array) -> mx.array:
    """bool, same shape: which block ids lie in [0, num_blocks)."""
    return (block_ids >= 0) & (block_ids < cache.num_blocks)


def append_slots(cache: LatentCache, block_table: mx.array, context_lens: mx.array) -> tuple[mx.array, mx.array]:
    """(slots int32 [B], ok bool [B]): the slot of each sequence's new token (position
    context_lens[b]), clamped into the pool, and whether its block table entry was valid."""
    bs = cache.block_size
    col = context_lens // bs
    inside = col < block_table.shape[1]
    col = mx.minimum(col, block_table.shape[1] - 1)
    blk = mx.take_along_axis(block_table, col[:, None], axis=1)[:, 0]
    ok = inside & in_pool(cache, blk)
    return mx.clip(blk, 0, cache.num_blocks - 1) * bs + context_lens % bs, ok


def attended(cache: LatentCache, block_table: mx.array, context_lens: mx.array) -> mx.array:
    """bool [B, max_blocks * block_size]: the tokens each sequence attends, its cached tokens plus
    the new one, in blocks inside the pool."""
    T = block_table.shape[1] * cache.block_size
    valid = mx.arange(T)[None, :] <= context_lens[:, None]
    return valid & mx.repeat(in_pool(cache, block_table), cache.block_size, axis=1)


def append_guarded(cache: LatentCache, slots: mx.array, ok: mx.array, latent: mx.array, k_pe: mx.array) -> None:
    """`cache.write(slots, latent, k_pe)`, where each row whose `ok` is False repeats the first
    valid row's write (see the module docstring)."""
    first = mx.argmax(ok.astype(mx.int32))
    src = mx.where(ok, mx.arange(ok.shape[0]), first)
    cache.write(slots[src], latent[src], k_pe[src])


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
    append_guarded(cache, *append_slots(cache, block_table, context_lens), new_latent, new_kpe)

    # Padding entries of the block table may hold any value; they are masked below, as are
    # entries outside the pool.
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
    valid = attended(cache, block_table, context_lens)
    scores = mx.where(valid[:, None, :], scores, -mx.inf)
    p = mx.softmax(scores, axis=-1)
    out = p @ latent
    return mx.where(valid.any(axis=1)[:, None, None], out, 0.0).astype(cache.dtype)
