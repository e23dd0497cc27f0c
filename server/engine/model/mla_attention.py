"""One MLA attention layer in the absorbed form, over a flat batch of tokens and the paged cache.

The tokens of a step are laid out flat: first one decode token per decoding sequence, then the
chunks: a sequence verifying a draft (its newest token and the drafted ones: spec_decode/) and the
prefilling sequences. Every token carries its own position, so rope and the llama-4
attention scale follow each sequence's own length. Decode tokens go through the fused
`mla_decode_append`; a prefill chunk writes its latents into the cache and attends causally over
the dequantized cached prefix plus itself, so a token contributes the same value whether it was
computed in this chunk, an earlier one, or by another request that shared the prefix.

The layer's weights are mlx-lm's own (`Mistral4Attention` / `DeepseekV3Attention`): `embed_q`
and `unembed_out` are the absorbed halves of `kv_b_proj`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ...kernels.cpu_streams import run_parts
from ...kernels.dense_cache import DenseLatentCache
from ...kernels.latent_cache import LatentCache
from ...kernels.mla_decode import mla_decode_append
from ...platform import current_platform


@dataclass
class PrefillChunk:
    start: int  # tokens of this sequence already in the cache
    length: int
    block_ids: mx.array  # int32 [ceil((start + length) / block_size)]
    slots: mx.array  # int32 [length]: where the chunk's tokens go
    # The attention's bucketed layout (`sdpa_layout`), None: the chunk's own lengths; with a
    # masked layout, its additive mask (`sdpa_mask`), made by the first layer for all of them.
    layout: SdpaLayout | None = None
    mask: mx.array | None = None


@dataclass
class AttentionBatch:
    """Per-step inputs shared by every layer."""

    positions: mx.array  # int32 [T]
    num_decodes: int
    block_table: mx.array | None  # int32 [num_decodes, max_blocks]
    context_lens: mx.array | None  # int32 [num_decodes]
    prefills: list[PrefillChunk]
    attn_scale: mx.array | None  # [T, 1, 1] the model's query scale by position (mistral4), or None


def mla_attention(
    attn: Any,
    x: mx.array,
    cache: LatentCache | DenseLatentCache,
    batch: AttentionBatch,
    decode_backend: str,
    mark: Callable[..., None] | None = None,
) -> mx.array:
    """x [T, D] -> [T, D]; appends every token's latent and rope key to `cache`. Decode tokens
    attend through `decode_backend` (`mla_decode_append`'s; the bf16 cache has its own). `mark(name,
    *arrays)`, if given, is called after the projections, decode and prefill attention, and o_proj."""
    T = x.shape[0]
    H, nope, P = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    q = attn.q_proj(x) if attn.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q = q.reshape(T, H, nope + P)
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    kv = attn.kv_a_proj_with_mqa(x)
    latent = attn.kv_a_layernorm(kv[:, : attn.kv_lora_rank])
    # Each token is its own rope "batch" row, so each gets its own position offset.
    q_pe = _rope(attn.rope, q_pe[:, :, None, :], batch.positions)[:, :, 0, :]
    k_pe = _rope(attn.rope, kv[:, None, None, attn.kv_lora_rank :], batch.positions)[:, 0, 0, :]
    if batch.attn_scale is not None:
        q_nope = q_nope * batch.attn_scale.astype(q_nope.dtype)
        q_pe = q_pe * batch.attn_scale.astype(q_pe.dtype)
    if mark:
        mark("attn_proj", q_nope, q_pe, latent, k_pe)
    # Prefill writes go in before the decode kernel appends in place: the scatter can then take
    # over the evaluated pool buffers instead of copying a pool the kernel has just written to.
    d, offset = batch.num_decodes, batch.num_decodes
    for chunk in batch.prefills:
        rows = slice(offset, offset + chunk.length)
        offset += chunk.length
        cache.write(chunk.slots, latent[rows], k_pe[rows])

    outs = []  # each [rows, H, v]
    if d:
        assert batch.block_table is not None and batch.context_lens is not None  # set with decodes
        q_latent = attn.embed_q(q_nope[:d].swapaxes(0, 1)).swapaxes(0, 1)  # [d, H, R]
        if isinstance(cache, DenseLatentCache):  # --latent-cache bf16
            o = cache.decode_append(
                q_latent, q_pe[:d], latent[:d], k_pe[:d], batch.block_table, batch.context_lens, attn.scale
            )
        else:
            o = mla_decode_append(
                q_latent,
                q_pe[:d],
                latent[:d],
                k_pe[:d],
                cache,
                batch.block_table,
                batch.context_lens,
                attn.scale,
                backend=decode_backend,
            )
        outs.append(attn.unembed_out(o.astype(x.dtype).swapaxes(0, 1)).swapaxes(0, 1))
        if mark:
            mark("attn_decode", outs[-1])
    offset = d
    for chunk in batch.prefills:
        rows = slice(offset, offset + chunk.length)
        offset += chunk.length
        outs.append(_prefill_attention(attn, q_nope[rows], q_pe[rows], cache, chunk))
        if mark:
            mark("attn_prefill", outs[-1])
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
    projected: mx.array = attn.o_proj(out.astype(x.dtype).reshape(T, -1))
    if mark:
        mark("attn_o_proj", projected)
    return projected


# MLX's CUDA rope with one offset per row fails (cudaGraphAddKernelNode: invalid argument) from
# some row count between 100 and 128 on (seen on an H100, MLX 0.32.4: the demo model's yarn rope,
# P=16; 64 and 100 rows worked), so on CUDA the rows are rotated in groups of at most this many.
_CUDA_ROPE_ROWS = 64


def _rope(rope: Any, x: mx.array, positions: mx.array) -> mx.array:
    """`rope(x, offset=positions)` with one offset per row of `x` [T, ...]."""
    rows = x.shape[0]
    if rows <= _CUDA_ROPE_ROWS or current_platform().backend != "cuda":
        out: mx.array = rope(x, offset=positions)
        return out
    step = _CUDA_ROPE_ROWS
    return mx.concatenate([rope(x[i : i + step], offset=positions[i : i + step]) for i in range(0, rows, step)])


# On the CPU, prefill attention runs its queries in blocks of this many, each over only the keys
# it can see (see `_prefill_attention`); 64 measured best of 16-256 on the demo shape.
_CPU_QUERY_BLOCK = 64


def sdpa_bucket(length: int) -> int:
    """The length a CUDA prefill attention runs at for `length` queries or keys: the next multiple
    of 64 below 1024, and from 1024 on of an eighth of the power of two at or below it (at most
    1/8 more), so the lengths of a 32K context fall into 56 buckets.

    Why: MLX's CUDA SDPA builds one cuDNN graph per exact (queries, keys) shape and keeps 256
    (mlx/backend/cuda/scaled_dot_product_attention.cpp); a build costs tens to hundreds of
    milliseconds (reported 55-70 ms by FlashInfer, about 400 ms by SGLang). Prompts of distinct
    lengths give every chunk a shape never seen; buckets bound the graphs a server ever builds."""
    granule = max(64, (1 << (max(1, length).bit_length() - 1)) // 8)
    return -(-length // granule) * granule


def cudnn_prefill(qk_dim: int, v_dim: int, dtype: mx.Dtype) -> bool:
    """Whether MLX's CUDA SDPA runs a prefill of these head sizes through cuDNN (so a graph per
    shape; `supports_sdpa_cudnn` in MLX 0.32): half-precision heads of at most 128, multiples of 8
    (Mistral Small 4's 128 and 128). DeepSeek's 192-wide query heads, and float32, take MLX's
    composed fallback, which builds no graph and so gains nothing from padding."""
    sizes = qk_dim <= 128 and v_dim <= 128 and qk_dim % 8 == 0 and v_dim % 8 == 0
    return sizes and dtype in (mx.float16, mx.bfloat16)


@dataclass(frozen=True)
class SdpaLayout:
    """A prefill chunk's attention at bucketed lengths: `front` zero query rows, the chunk's `n`,
    then zero rows up to `queries`; the sequence's S keys, then zero keys up to `keys`."""

    front: int
    queries: int
    keys: int
    masked: bool  # an explicit mask (`sdpa_mask`) instead of SDPA's causal one


def sdpa_layout(n: int, S: int) -> SdpaLayout:
    """The bucketed layout of a chunk of `n` queries over `S` keys (its own and its prefix), the
    cheaper in scores computed of two:

    - causal: SDPA's causal mask aligns the last query with the last key (query row i of Q sees
      the keys up to i + K - Q). Padding the keys to K = sdpa_bucket(S) and the queries after the
      chunk by as many (K - S) rows keeps real query r seeing keys up to S - n + r, as without
      padding, whatever `front` is; the padding keys are seen only by rows after the chunk, whose
      outputs are dropped. `front` fills the queries up to Q = sdpa_bucket(n + K - S) <= K, so
      every row sees a key. SDPA skips the scores above the diagonal.
    - masked: queries padded only to sdpa_bucket(n), and a mask that says which keys each sees.
      All Q x K scores are computed, but a short chunk over a long prefix (a new turn of a long
      conversation) no longer attends with as many query rows as the keys' padding.
    """
    keys = sdpa_bucket(S)
    back = keys - S
    aligned, plain = sdpa_bucket(n + back), sdpa_bucket(n)
    if aligned * keys - aligned * aligned // 2 <= plain * keys:
        return SdpaLayout(aligned - n - back, aligned, keys, masked=False)
    return SdpaLayout(0, plain, keys, masked=True)


def sdpa_mask(layout: SdpaLayout, n: int, S: int, dtype: mx.Dtype) -> mx.array:
    """[1, 1, queries, keys] additive mask of a masked layout: query row r (the chunk's rows first,
    front = 0) sees key j when j < S and j <= S - n + r; the rest gets the dtype's lowest value."""
    rows = mx.arange(layout.queries)[:, None]
    cols = mx.arange(layout.keys)[None]
    seen = (cols < S) & (cols <= S - n + rows)
    return mx.where(seen, mx.array(0, dtype), mx.array(mx.finfo(dtype).min, dtype))[None, None]


def _prefill_attention(
    attn: Any, q_nope: mx.array, q_pe: mx.array, cache: LatentCache | DenseLatentCache, chunk: PrefillChunk
) -> mx.array:
    """Causal attention of one chunk (q [n, H, *]) over its sequence's dequantized cache prefix
    plus itself (already written): [n, H, v].

    Unlike decode, prefill expands the latent into per-head keys and values (mlx-lm's own prefill
    form): with n queries per chunk the expansion costs less than the absorbed form's H x R wide
    scores, and SDPA's built-in causal mask (queries aligned to the last keys) needs no mask tensor.
    With `chunk.layout` (CUDA by default: EngineArgs.prefill_buckets), the queries and keys are
    padded to bucketed lengths (`sdpa_layout`).
    """
    S, n = chunk.start + chunk.length, chunk.length
    latent, k_pe = cache.read(chunk.block_ids, S)
    queries = mx.concatenate([q_nope, q_pe], axis=-1).swapaxes(0, 1)  # [H, n, nope + P]
    cpu = current_platform().backend == "cpu"
    layout, front = chunk.layout, 0
    if layout is not None:
        # Zero latents expand to zero keys and values (the projections have no bias): the padding
        # costs its share of the expansion, not a copy of the expanded keys.
        latent = mx.pad(latent, [(0, layout.keys - S), (0, 0)])
        k_pe = mx.pad(k_pe, [(0, layout.keys - S), (0, 0)])
        front = layout.front
        queries = mx.pad(queries, [(0, 0), (front, layout.queries - front - n), (0, 0)])
    latent = latent.astype(q_nope.dtype)[None]  # [1, keys, R]
    k_nope = attn.embed_q(latent, transpose=False)  # [H, keys, nope]
    values = _unembed_nn(attn.unembed_out, latent) if cpu else attn.unembed_out(latent)  # [H, keys, v]
    k_pe = mx.broadcast_to(k_pe.astype(q_pe.dtype)[None], (k_nope.shape[0], k_nope.shape[1], k_pe.shape[-1]))
    keys = mx.concatenate([k_nope, k_pe], axis=-1)
    if not cpu or n <= _CPU_QUERY_BLOCK or layout is not None:
        mask: mx.array | str = "causal"
        if layout is not None and layout.masked:
            if chunk.mask is None:
                chunk.mask = sdpa_mask(layout, n, S, queries.dtype)
            mask = chunk.mask
        out = mx.fast.scaled_dot_product_attention(queries[None], keys[None], values[None], scale=attn.scale, mask=mask)
        return out[0, :, front : front + n].swapaxes(0, 1)  # [n, H, v]
    # The CPU has no fused SDPA: MLX composes it from a full [H, n, S] score matmul, a mask, a
    # softmax (its exp alone ~10 ns an element here) and a second matmul, so the masked half of a
    # causal chunk costs as much as the rest. Query blocks over only the keys they see skip it:
    # each block's "causal" mask aligns its queries to its last keys, the same rows as before
    # (masked keys only ever added exact zeros; outputs are bit-identical on the demo model).
    # GPUs keep the one fused SDPA call. Keys are laid out [H, nope + P, S] so the score matmul
    # is an untransposed GEMM, which the reference BLAS that MLX's Linux CPU wheel bundles runs
    # ~1.2-1.8x faster than q @ k^T over [S, d] rows; the copy is S x (nope + P) per head.
    # The blocks are independent: `run_parts` spreads them over the CPU streams (one per core).
    keys = mx.contiguous(keys.swapaxes(-1, -2)).swapaxes(-1, -2)

    def block(a: int) -> Callable[[], mx.array]:
        b = min(n, a + _CPU_QUERY_BLOCK)
        k = chunk.start + b  # keys the block's last query sees
        return lambda: mx.fast.scaled_dot_product_attention(
            queries[None, :, a:b], keys[None, :, :k], values[None, :, :k], scale=attn.scale, mask="causal"
        )[0]

    outs = run_parts([block(a) for a in range(0, n, _CPU_QUERY_BLOCK)])
    return mx.concatenate(outs, axis=1).swapaxes(0, 1)  # [n, H, v]


def _unembed_nn(unembed_out: Any, latent: mx.array) -> mx.array:
    """`unembed_out(latent)` ([1, S, R] -> [H, S, v]), as an untransposed GEMM where it is a plain
    float `MultiLinear` (CPU only: the reference BLAS in MLX's Linux CPU wheel runs `x @ w.T` ~1.4x
    slower than `x @ w`; the transposed copy of w is H x v x R, tiny). Anything else (quantized
    halves) keeps its own call."""
    from mlx_lm.models.mla import MultiLinear

    if type(unembed_out) is not MultiLinear:
        out: mx.array = unembed_out(latent)
        return out
    return latent @ mx.contiguous(unembed_out.weight.swapaxes(-1, -2))
