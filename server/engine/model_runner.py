"""Runs one scheduled step through the model: flat token batch in, logits of sampled rows out.

The model's modules and weights are mlx-lm's (`mistral4`, `deepseek_v3`); only the attention is
ours (`mla_attention`), over one `LatentCache` per layer.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..kernels.latent_cache import LatentCache, latent_bytes_per_token
from .architectures import adapt_model
from .mla_attention import AttentionBatch, PrefillChunk, llama4_attn_scale, mla_attention
from .scheduler import StepPlan
from .sequence import Sequence

LATENT_GROUP_SIZE = 64  # MLX affine 4-bit quantization of the latent, in groups of 64


def cache_dtype(model: Any) -> mx.Dtype:
    """The cache's dtype: the model's activations' (its embeddings may be quantized)."""
    dtype: mx.Dtype = model.model.norm.weight.dtype
    return dtype


def cache_bytes_per_token(model: Any) -> int:
    """Latent cache bytes one token takes over all of the model's layers."""
    args = model.args
    per_layer = latent_bytes_per_token(args.kv_lora_rank, args.qk_rope_head_dim, LATENT_GROUP_SIZE, cache_dtype(model))
    return len(model.model.layers) * per_layer


class ModelRunner:
    def __init__(self, model: Any, num_blocks: int, block_size: int = 64) -> None:
        model = adapt_model(model)  # architectures.py: refuses unsupported types, adapts the rest
        args = model.args
        self.model = model
        self.inner = model.model
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size: int = args.vocab_size
        self.dtype = cache_dtype(model)
        rp = getattr(args, "rope_parameters", None) or {}
        self.llama4 = (
            (rp["llama_4_scaling_beta"], rp["original_max_position_embeddings"])
            if args.model_type == "mistral4" and "llama_4_scaling_beta" in rp
            else None
        )
        self.caches = [
            LatentCache(num_blocks, block_size, args.kv_lora_rank, args.qk_rope_head_dim, LATENT_GROUP_SIZE, self.dtype)
            for _ in self.inner.layers
        ]
        mx.eval(*[a for c in self.caches for a in c.arrays()])

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def run(self, plan: StepPlan) -> mx.array:
        """Logits [N, V] (float32) for the sequences that sample this step, in plan order:
        every decode, then every prefill whose chunk reaches the end of its sequence."""
        tokens, positions, last_rows = [], [], []
        for seq in plan.decodes:
            tokens.append(seq.token_ids[-1])
            positions.append(seq.num_computed)
            last_rows.append(len(tokens) - 1)
        chunks = []
        for seq, n in plan.prefills:
            start = seq.num_computed
            tokens.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            nb = -(-(start + n) // self.block_size)
            chunks.append(PrefillChunk(start, n, mx.array(seq.block_table[:nb], mx.int32), self._slots(seq, start, n)))
            if start + n == len(seq):
                last_rows.append(len(tokens) - 1)

        batch = AttentionBatch(
            positions=mx.array(positions, mx.int32),
            num_decodes=len(plan.decodes),
            block_table=self._block_table(plan.decodes) if plan.decodes else None,
            context_lens=mx.array([s.num_computed for s in plan.decodes], mx.int32) if plan.decodes else None,
            prefills=chunks,
            attn_scale=None,
        )
        if self.llama4:
            batch.attn_scale = llama4_attn_scale(batch.positions, *self.llama4)

        h = self.inner.embed_tokens(mx.array(tokens, mx.int32))
        for layer, cache in zip(self.inner.layers, self.caches, strict=False):
            h = h + mla_attention(layer.self_attn, layer.input_layernorm(h), cache, batch)
            h = h + layer.mlp(layer.post_attention_layernorm(h)[None])[0]
        h = self.inner.norm(h[mx.array(last_rows, mx.int32)])
        logits = self.model.lm_head(h) if hasattr(self.model, "lm_head") else self.inner.embed_tokens.as_linear(h)
        out: mx.array = logits.astype(mx.float32)
        return out

    def cache_arrays(self) -> list[mx.array]:
        return [a for c in self.caches for a in c.arrays()]

    def _slots(self, seq: Sequence, start: int, n: int) -> mx.array:
        bs = self.block_size
        return mx.array([seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)], mx.int32)

    def _block_table(self, seqs: list[Sequence]) -> mx.array:
        width = max(len(s.block_table) for s in seqs)
        return mx.array([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], mx.int32)
