"""An fp32 numpy implementation of the decode step, independent of MLX's dequantize and attention."""

from __future__ import annotations

from typing import Any

import numpy as np


def dequantize_np(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int) -> np.ndarray:
    """packed uint32 [..., R/8] (nibble i of word w is element 8w+i), scales/biases [..., R/gs] -> [..., R]."""
    shifts = np.arange(8, dtype=np.uint32) * 4
    q = (packed[..., None] >> shifts) & 0xF
    q = q.reshape(*packed.shape[:-1], -1).astype(np.float32)
    s = np.repeat(scales.astype(np.float32), group_size, axis=-1)
    b = np.repeat(biases.astype(np.float32), group_size, axis=-1)
    return q * s + b


def decode_np(
    q_latent: np.ndarray,
    q_pe: np.ndarray,
    cache_np: dict[str, Any],
    block_table: np.ndarray,
    context_lens: list[int],
    scale: float,
    group_size: int,
    block_size: int,
) -> np.ndarray:
    """cache_np: float32/uint32 numpy copies of the cache fields after the append -> out [B, H, R] float32.
    Tokens in blocks outside [0, num_blocks) are left out; a row left with none is zeros."""
    B, H, R = q_latent.shape
    num_blocks = cache_np["packed"].shape[0]
    out = np.zeros((B, H, R), np.float32)
    for b in range(B):
        n = int(context_lens[b]) + 1
        blocks = block_table[b, : (n + block_size - 1) // block_size]
        pos = np.arange(n)
        blk = blocks[pos // block_size]
        keep = (blk >= 0) & (blk < num_blocks)
        if not keep.any():
            continue
        slots = blk[keep] * block_size + pos[keep] % block_size

        def rows(a: np.ndarray, slots: np.ndarray = slots) -> np.ndarray:
            picked: np.ndarray = a.reshape(-1, a.shape[-1])[slots]
            return picked

        lat = dequantize_np(rows(cache_np["packed"]), rows(cache_np["scales"]), rows(cache_np["biases"]), group_size)
        kpe = rows(cache_np["k_pe"]).astype(np.float32)
        s = scale * (q_latent[b].astype(np.float32) @ lat.T + q_pe[b].astype(np.float32) @ kpe.T)
        s = s - s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        out[b] = p @ lat
    return out
