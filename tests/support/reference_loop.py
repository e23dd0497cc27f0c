"""The oracle for engine tests: mlx-lm's own model forward with an INT4 latent, one sequence.

It quantizes each new latent exactly as the engine's cache does (MLX affine 4-bit, group 64, in the
cache dtype), so the only differences from the engine are the ones under test: paging, batching,
chunking, the absorbed/fused attention and the architecture adapter (server/engine/model/architectures.py).

Two kinds of mlx-lm attention:
- absorbed (`embed_q` / `unembed_out`: mistral4, deepseek_v3, glm4_moe_lite, longcat_flash, kimi):
  mlx-lm caches the latent and rope key; `QuantizedLatentCache` hands it back dequantized.
- whole `kv_b_proj` (deepseek_v2, minicpm3, youtu_llm): mlx-lm caches per-head keys and values
  expanded from the latent; the latent is rounded through INT4 where it is made (the output of
  `kv_a_layernorm`), before `kv_b_proj` expands it, and mlx-lm's own KV cache holds the rest.

The model must be mlx-lm's, not yet adapted by the engine (adapting replaces its attention).
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache


def int4_round_trip(latent: mx.array, group_size: int = 64) -> mx.array:
    q = mx.quantize(latent, group_size, 4)
    return mx.dequantize(*q, group_size, 4).astype(latent.dtype)


class QuantizedLatentCache:
    """mlx-lm's cache protocol (`offset`, `update_and_fetch`) over an INT4 latent."""

    def __init__(self, group_size: int = 64):
        self.group_size = group_size
        self.offset = 0
        self.latent = None
        self.k_pe = None

    def update_and_fetch(self, latent: mx.array, k_pe: mx.array):
        latent = int4_round_trip(latent, self.group_size)
        self.latent = latent if self.latent is None else mx.concatenate([self.latent, latent], axis=2)
        self.k_pe = k_pe if self.k_pe is None else mx.concatenate([self.k_pe, k_pe], axis=2)
        self.offset += latent.shape[2]
        return self.latent, self.k_pe


class _QuantizedNorm(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def __call__(self, x):
        return int4_round_trip(self.norm(x))


@contextmanager
def int4_latent_cache(model):
    """The prompt cache to run `model` with, its latents rounded through INT4 as the engine's."""
    attn = model.layers[0].self_attn
    if isinstance(attn, list):  # longcat_flash: two attentions per layer
        yield [tuple(QuantizedLatentCache() for _ in layer.self_attn) for layer in model.layers]
    elif "embed_q" in attn:
        yield [QuantizedLatentCache() for _ in model.layers]
    else:
        norms = [layer.self_attn.kv_a_layernorm for layer in model.layers]
        for layer, norm in zip(model.layers, norms, strict=True):
            layer.self_attn.kv_a_layernorm = _QuantizedNorm(norm)
        try:
            yield make_prompt_cache(model)
        finally:
            for layer, norm in zip(model.layers, norms, strict=True):
                layer.self_attn.kv_a_layernorm = norm


def greedy_reference(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    with int4_latent_cache(model) as cache:
        logits = model(mx.array([prompt_ids]), cache=cache)[0, -1]
        out = []
        for _ in range(max_tokens):
            tok = int(mx.argmax(logits).item())
            out.append(tok)
            logits = model(mx.array([[tok]]), cache=cache)[0, -1]
    return out
