"""One MLA attention layer in the absorbed form, over a flat batch of tokens and the paged cache.

The tokens of a step are laid out flat: first one decode token per decoding sequence, then the
chunks of the prefilling sequences. Every token carries its own position, so rope and the llama-4
attention scale follow each sequence's own length. Decode tokens go through the fused
`mla_decode_append`; a prefill chunk writes its latents into the cache and attends causally over
the dequantized cached prefix plus itself, so a token contributes the same value whether it was
computed in this chunk, an earlier one, or by another request that shared the prefix.

The layer's weights are mlx-lm's own (`Mistral4Attention` / `DeepseekV3Attention`): `embed_q`
and `unembed_out` are the absorbed halves of `kv_b_proj`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..kernels.latent_cache import LatentCache
from ..kernels.mla_decode import mla_decode_append


@dataclass
class PrefillChunk:
    start: int  # tokens of this sequence already in the cache
    length: int
    block_ids: mx.array  # int32 [ceil((start + length) / block_size)]
    slots: mx.array  # int32 [length]: where the chunk's tokens go


@dataclass
class AttentionBatch:
    """Per-step inputs shared by every layer."""

    positions: mx.array  # int32 [T]
    num_decodes: int
    block_table: mx.array | None  # int32 [num_decodes, max_blocks]
    context_lens: mx.array | None  # int32 [num_decodes]
    prefills: list[PrefillChunk]
    attn_scale: mx.array | None  # [T, 1, 1] llama-4 query scale, or None


def llama4_attn_scale(positions: mx.array, beta: float, original_max: int) -> mx.array:
    """[T, 1, 1]: mistral4's query scale 1 + beta * log(1 + floor(pos / original_max))."""
    s = 1 + beta * mx.log(1 + mx.floor(positions.astype(mx.float32) / original_max))
    return s[:, None, None]


def mla_attention(attn, x: mx.array, cache: LatentCache, batch: AttentionBatch) -> mx.array:
    """x [T, D] -> [T, D]; appends every token's latent and rope key to `cache`."""
    T = x.shape[0]
    H, nope, P = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    if attn.q_lora_rank is None:
        q = attn.q_proj(x)
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q = q.reshape(T, H, nope + P)
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    kv = attn.kv_a_proj_with_mqa(x)
    latent = attn.kv_a_layernorm(kv[:, : attn.kv_lora_rank])
    # Each token is its own rope "batch" row, so each gets its own position offset.
    q_pe = attn.rope(q_pe[:, :, None, :], offset=batch.positions)[:, :, 0, :]
    k_pe = attn.rope(kv[:, None, None, attn.kv_lora_rank :], offset=batch.positions)[:, 0, 0, :]
    if batch.attn_scale is not None:
        q_nope = q_nope * batch.attn_scale.astype(q_nope.dtype)
        q_pe = q_pe * batch.attn_scale.astype(q_pe.dtype)
    q_latent = attn.embed_q(q_nope.swapaxes(0, 1)).swapaxes(0, 1)  # [T, H, R]

    # Prefill writes go in before the decode kernel appends in place: the scatter can then take
    # over the evaluated pool buffers instead of copying a pool the kernel has just written to.
    d, offset = batch.num_decodes, batch.num_decodes
    for chunk in batch.prefills:
        rows = slice(offset, offset + chunk.length)
        offset += chunk.length
        cache.write(chunk.slots, latent[rows], k_pe[rows])

    outs = []
    if d:
        outs.append(
            mla_decode_append(
                q_latent[:d], q_pe[:d], latent[:d], k_pe[:d], cache,
                batch.block_table, batch.context_lens, attn.scale,
            )
        )
    offset = d
    for chunk in batch.prefills:
        rows = slice(offset, offset + chunk.length)
        offset += chunk.length
        outs.append(_prefill_attention(attn, q_latent[rows], q_pe[rows], cache, chunk))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)  # [T, H, R]
    out = attn.unembed_out(out.astype(x.dtype).swapaxes(0, 1)).swapaxes(0, 1)  # [T, H, v]
    return attn.o_proj(out.reshape(T, -1))


def _prefill_attention(attn, q_latent, q_pe, cache: LatentCache, chunk: PrefillChunk):
    """Causal attention of one chunk [n, H, *] over its sequence's cache prefix plus itself
    (already written)."""
    S = chunk.start + chunk.length
    keys, keys_pe = cache.read(chunk.block_ids, S)
    scale = attn.scale
    # The rope scores ride in as SDPA's additive mask, as in mlx-lm's own MLA decode.
    pe_scores = (q_pe.swapaxes(0, 1) * scale) @ keys_pe.T.astype(q_pe.dtype)  # [H, n, S]
    q_pos = chunk.start + mx.arange(chunk.length)
    causal = mx.arange(S)[None, :] <= q_pos[:, None]
    pe_scores = mx.where(causal, pe_scores, mx.array(-mx.inf, pe_scores.dtype))
    keys = keys.astype(q_latent.dtype)[None, None]
    out = mx.fast.scaled_dot_product_attention(
        q_latent.swapaxes(0, 1)[None], keys, keys, scale=scale, mask=pe_scores[None]
    )
    return out[0].swapaxes(0, 1)  # [n, H, R]
