"""Loads a model (local directory or Hugging Face repo id) through mlx-lm, with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from .model_runner import SUPPORTED_ARCHITECTURES
from .types import EngineError


def load_model(model: str) -> tuple[Any, Any]:
    """(model, tokenizer) through mlx-lm's loader; clear errors for what a user can fix."""
    from mlx_lm.utils import load

    local = Path(model).expanduser()
    if not local.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise EngineError(f"model not found: {model!r} is neither a local directory nor a repo id")
    try:
        model_obj, tokenizer = load(str(local) if local.exists() else model)[:2]
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise EngineError(f"could not load model {model!r}: {exc}") from exc
    model_type = getattr(model_obj.args, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise EngineError(
            f"model {model!r} has architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    _unquantize_absorbed_on_cuda(model_obj)
    return model_obj, tokenizer


def _unquantize_absorbed_on_cuda(model: Any) -> None:
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
