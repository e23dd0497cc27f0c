"""Bytes one token occupies in one layer's attention cache, per server, from a model's config.json.

MLA models cache the compressed latent (kv_lora_rank = R) and the shared rope key (P) per token:
- ours: R as MLX affine INT4 (R/2 bytes) with a scale and a bias per group of 64 in the model
  dtype, plus the rope key in the model dtype (see server/kernels/latent_cache.py);
- mlx_lm.server: mlx-lm's KVCache holds latent and rope key in the model dtype;
- mlx_lm.server --kv-bits 4: its QuantizedKVCache would hold both as INT4 with per-group scale and
  bias, but only past --quantized-kv-start tokens (5000 by default), and mlx-lm 0.32.2's mistral4
  decode cannot read a quantized cache (see docs/benchmarks.md), so the full-precision figure applies.
"""

from __future__ import annotations

from typing import Any

GROUP = 64
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def dtype_bytes(config: dict[str, Any]) -> int:
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return _DTYPE_BYTES.get(str(dtype), 2)


def int4_row_bytes(dim: int, scale_bytes: int) -> int:
    """An affine 4-bit row of `dim` values: packed nibbles plus a scale and a bias per group."""
    return dim // 2 + 2 * -(-dim // GROUP) * scale_bytes


def ours(config: dict[str, Any]) -> int:
    d = dtype_bytes(config)
    return int4_row_bytes(config["kv_lora_rank"], d) + int(config["qk_rope_head_dim"]) * d


def mlx_lm_full(config: dict[str, Any]) -> int:
    return (int(config["kv_lora_rank"]) + int(config["qk_rope_head_dim"])) * dtype_bytes(config)


def mlx_lm_int4(config: dict[str, Any]) -> int:
    """What --kv-bits 4 would cost past --quantized-kv-start, were it usable for this model."""
    d = dtype_bytes(config)
    return int4_row_bytes(config["kv_lora_rank"], d) + int4_row_bytes(config["qk_rope_head_dim"], d)
