"""The oracle for engine tests: mlx-lm's own model forward with an INT4 latent cache, one sequence.

It quantizes each new latent exactly as the engine's cache does (MLX affine 4-bit, group 64, in the
cache dtype) and hands mlx-lm back the dequantized history, so the only differences from the
engine are the ones under test: paging, batching, chunking and the absorbed/fused attention.
"""

from __future__ import annotations

import mlx.core as mx


class QuantizedLatentCache:
    """mlx-lm's cache protocol (`offset`, `update_and_fetch`) over an INT4 latent."""

    def __init__(self, group_size: int = 64):
        self.group_size = group_size
        self.offset = 0
        self.latent = None
        self.k_pe = None

    def update_and_fetch(self, latent: mx.array, k_pe: mx.array):
        q = mx.quantize(latent, self.group_size, 4)
        latent = mx.dequantize(*q, self.group_size, 4).astype(latent.dtype)
        self.latent = latent if self.latent is None else mx.concatenate([self.latent, latent], axis=2)
        self.k_pe = k_pe if self.k_pe is None else mx.concatenate([self.k_pe, k_pe], axis=2)
        self.offset += latent.shape[2]
        return self.latent, self.k_pe


def greedy_reference(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    cache = [QuantizedLatentCache() for _ in model.layers]
    logits = model(mx.array([prompt_ids]), cache=cache)[0, -1]
    out = []
    for _ in range(max_tokens):
        tok = int(mx.argmax(logits).item())
        out.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)[0, -1]
    return out
