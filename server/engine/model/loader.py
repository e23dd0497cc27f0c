"""Loads a model (local directory or Hugging Face repo id) through mlx-lm, with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten

from ..types import EngineError
from .architectures import Architecture, UnsupportedArchitecture, check_supported, no_quantized_multilinear


def load_model(model: str, one_layer_per_kind: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) through mlx-lm's loader; clear errors for what a user can fix, an
    architecture the engine does not serve included (architectures.py). The model is still
    mlx-lm's (so it can be sharded); the factory adapts it (`factory.engine_model`) for the engine.

    `one_layer_per_kind`: keep only the first layer of each kind (same parameter names, shapes and
    types) and read only those weights: a model that runs the same kernels as the whole one, in a
    fraction of its memory (warmup.py's compile workers)."""
    from mlx_lm.utils import load

    local = Path(model).expanduser()
    if not local.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise EngineError(f"model not found: {model!r} is neither a local directory nor a repo id")
    try:
        # Lazy: an architecture the engine refuses is refused before its weights are read.
        model_obj, tokenizer = load(str(local) if local.exists() else model, lazy=True)[:2]
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise EngineError(f"could not load model {model!r}: {exc}") from exc
    try:
        architecture = check_supported(model_obj)
    except UnsupportedArchitecture as exc:
        raise UnsupportedArchitecture(f"model {model!r}: {exc}") from None
    if one_layer_per_kind:
        _keep_one_layer_per_kind(model_obj)
    _unquantize_absorbed_on_cuda(model_obj, architecture)
    mx.eval(model_obj.parameters())
    return model_obj, tokenizer


def _keep_one_layer_per_kind(model: Any) -> None:
    """Drop each layer whose parameters an earlier layer has in the same names, shapes and types.
    The weights are still lazy here, so a dropped layer's are never read."""
    seen: set[tuple[tuple[str, tuple[int, ...], str], ...]] = set()
    kept = []
    for layer in model.model.layers:
        params = cast(list[tuple[str, mx.array]], tree_flatten(layer.parameters()))
        kind = tuple((name, tuple(p.shape), str(p.dtype)) for name, p in params)
        if kind not in seen:
            seen.add(kind)
            kept.append(layer)
    model.model.layers = kept


def _unquantize_absorbed_on_cuda(model: Any, architecture: Architecture) -> None:
    """MLX's CUDA backend has no quantized matmul for `embed_q`/`unembed_out` (transpose=False).
    (Models that keep `kv_b_proj` whole get float halves when the engine splits it.)"""
    if not no_quantized_multilinear():
        return
    from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear

    for layer in model.model.layers:
        attns = architecture.attentions(layer)
        for attn, name in ((a, n) for a in attns for n in ("embed_q", "unembed_out") if "embed_q" in a):
            q = getattr(attn, name)
            if isinstance(q, QuantizedMultiLinear):
                w = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
                lin = MultiLinear(w.shape[-1], w.shape[-2], w.shape[0])
                lin.weight = w.astype(q.scales.dtype)
                setattr(attn, name, lin)
