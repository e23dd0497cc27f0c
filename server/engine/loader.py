"""Loads a model (local directory or Hugging Face repo id) through mlx-lm and sizes the cache pool."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from .model_runner import SUPPORTED_ARCHITECTURES
from .types import EngineError


BLOCK_SIZE = 64


def load_model(model: str):
    """(model, tokenizer) through mlx-lm's loader; clear errors for what a user can fix."""
    from mlx_lm.utils import load

    local = Path(model).expanduser()
    if not local.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise EngineError(f"model not found: {model!r} is neither a local directory nor a repo id")
    try:
        model_obj, tokenizer = load(str(local) if local.exists() else model)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise EngineError(f"could not load model {model!r}: {exc}") from exc
    model_type = getattr(model_obj.args, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise EngineError(
            f"model {model!r} has architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    _unquantize_absorbed_on_cuda(model_obj)
    return model_obj, tokenizer


def _unquantize_absorbed_on_cuda(model) -> None:
    """MLX's CUDA backend has no quantized matmul for `embed_q`/`unembed_out` (transpose=False)."""
    if not (mx.default_device() == mx.gpu and mx.cuda.is_available()):
        return
    from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear

    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ("embed_q", "unembed_out"):
            q = getattr(attn, name)
            if isinstance(q, QuantizedMultiLinear):
                w = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
                lin = MultiLinear(w.shape[-1], w.shape[-2], w.shape[0])
                lin.weight = w.astype(q.scales.dtype)
                setattr(attn, name, lin)


def cache_tokens_for(settings, bytes_per_token: int, max_model_len: int) -> int:
    """Pool size in tokens: --cache-tokens, or a fraction of free memory, never more than
    `max_num_seqs` full-length sequences could use."""
    if getattr(settings, "cache_tokens", None):
        return int(settings.cache_tokens)
    ceiling = settings.max_num_seqs * max_model_len
    free = _free_memory_bytes()
    by_memory = int(free * settings.cache_memory_fraction) // bytes_per_token
    return max(BLOCK_SIZE, min(ceiling, by_memory))


def _free_memory_bytes() -> int:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    total = info.get("max_recommended_working_set_size") or info.get("memory_size")
    if total:
        return max(0, int(total) - mx.get_active_memory())
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30
