"""The routed experts of an MoE layer, as the engine runs them.

mlx-lm's `SwitchGLU` keeps every expert's gate and up projections as two stacked matrices and
multiplies the tokens with each (`gather_qmm`), then with `down_proj`. Two changes here:

- `FusedSwitchGLU`: the gate and up matrices stacked along their output dimension into one
  `gate_up` (quantization groups run along the input dimension, so stacking rows keeps every
  group whole): one matrix product where there were two, on every backend, each output element
  the same dot product as before. `fuse_experts(model)` swaps it in for each SwitchGLU; the engine
  calls it after any tensor-parallel sharding, which splits gate and up alike along that same
  output dimension.
- `run_by_expert`: the (token, slot) pairs sorted by expert on the host and one quantized matrix
  product per expert over its contiguous rows, for large batches on CUDA, where MLX's
  `gather_qmm` runs row by row; `by_expert` picks the candidates by size, and
  `pays_one_at_a_time` decides from the experts the router chose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.nn.layers.base import Module
from mlx_lm.models import switch_layers
from mlx_lm.models.switch_layers import SwitchGLU

from ...platform import current_platform

# mlx-lm's own sort of (token, slot) pairs by expert and its inverse, as SwitchGLU uses them.
_gather_sort: Callable[[mx.array, mx.array], tuple[mx.array, mx.array, mx.array]] = switch_layers._gather_sort
_scatter_unsort: Callable[[mx.array, mx.array, tuple[int, ...]], mx.array] = switch_layers._scatter_unsort

# With EngineArgs.moe_by_expert "auto", a batch on CUDA (`platform.DEFAULTS`) is a candidate for one expert at a time when
# it gives the experts at least this many rows each on average (tokens x top-k / experts).
# Measured on the H100 (8-layer Mistral-Small-4 shape: 128 experts, top 4; docs/serving.md): one at
# a time costs a near-constant ~25 ms a step (one launch per expert), gather_qmm grows by ~0.4 ms a
# token; 64 tokens (2 rows each) ran faster through gather_qmm, 128 (4 each) one at a time.
MOE_BY_EXPERT_MIN_ROWS = 3
# A candidate then runs one expert at a time only if its rows are at least this many times the
# experts the router chose: that path pays a launch per active expert, gather_qmm a share per row.
# One Mistral-Small-4-sized layer on the H100, tokens spread over all 128 experts (docs/serving.md):
# ~0.12 ms per active expert against ~0.01 ms per row, so they break even near 12 rows an expert.
# The synthetic model's router concentrates a batch on a few dozen experts and passes easily; a
# trained router spreads it, and a 100-400-token chunk then runs faster gathered.
MIN_ROWS_PER_ACTIVE_EXPERT = 12

_STACKED = ("weight", "scales", "biases", "bias")  # the arrays a (Quantized)SwitchLinear may hold


class FusedSwitchGLU(Module):
    """mlx-lm's SwitchGLU with `gate_proj` and `up_proj` stacked into `gate_up` (the gate's rows
    first); called like SwitchGLU: (x [..., D], indices [..., k]) -> [..., k, D]."""

    def __init__(self, glu: SwitchGLU) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.hidden = glu.gate_proj.output_dims
        gate, up = glu.gate_proj, glu.up_proj
        for name in _STACKED:  # into the gate's module, so its class and settings carry over
            if gate.get(name) is not None:
                gate[name] = mx.concatenate([gate[name], up[name]], axis=1)
        self.gate_up = gate
        self.down_proj = glu.down_proj
        self.activation = glu.activation

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # mlx-lm's SwitchGLU.__call__, with the one projection.
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= 64  # sorted by expert, the weights are read in order
        idx = indices
        if do_sort:
            x, idx, inverse = _gather_sort(x, indices)
        gate, up = mx.split(self.gate_up(x, idx, sorted_indices=do_sort), [self.hidden], axis=-1)
        x = self.down_proj(self.activation(up, gate), idx, sorted_indices=do_sort)
        if do_sort:
            x = _scatter_unsort(x, inverse, indices.shape)
        out: mx.array = x.squeeze(-2)
        return out


def _fusable(glu: Any) -> bool:
    """A SwitchGLU (not a subclass) whose gate and up projections are alike but for their rows;
    a per-expert global scale (nvfp4) differs between them, so those stay apart."""
    if type(glu) is not SwitchGLU:
        return False
    gate, up = glu.gate_proj, glu.up_proj
    settings = ("group_size", "bits", "mode", "input_dims")
    return (
        type(gate) is type(up)
        and getattr(gate, "global_scale", None) is None
        and getattr(up, "global_scale", None) is None
        and all(getattr(gate, s, None) == getattr(up, s, None) for s in settings)
        and [gate.get(n) is None for n in _STACKED] == [up.get(n) is None for n in _STACKED]
    )


def fuse_experts(model: Any) -> int:
    """Replace every fusable `switch_mlp` in `model` by a FusedSwitchGLU, one layer evaluated at a
    time (so the separate matrices are freed as it goes); the number replaced."""
    fused = 0
    for module in model.modules():
        glu = module.get("switch_mlp") if isinstance(module, dict) else None
        if glu is not None and _fusable(glu):
            module["switch_mlp"] = FusedSwitchGLU(glu)
            mx.eval(module["switch_mlp"].gate_up.parameters())
            fused += 1
    return fused


def by_expert(mlp: Any, tokens: int, mode: str) -> bool:
    """Whether this MoE runs its routed experts one at a time; mode: "auto", "on" or "off"."""
    switch = getattr(mlp, "switch_mlp", None)
    if not isinstance(switch, FusedSwitchGLU) or switch.down_proj.get("scales") is None:
        return False
    if mode == "on":
        return True
    experts = switch.down_proj.weight.shape[0]
    return (
        mode == "auto"
        and current_platform().defaults.moe_by_expert
        and tokens * mlp.num_experts_per_tok >= MOE_BY_EXPERT_MIN_ROWS * experts
    )


def pays_one_at_a_time(inds: np.ndarray, mode: str) -> bool:
    """For a candidate batch (`by_expert`), once the router's choice `inds` is on the host: whether
    its rows are enough for the experts it uses ("on" always runs one at a time)."""
    return mode == "on" or inds.size >= MIN_ROWS_PER_ACTIVE_EXPERT * len(np.unique(inds))


def _expert_matmul(lin: Any, a: mx.array, e: int) -> mx.array:
    """Rows `a` through expert `e` of a QuantizedSwitchLinear."""
    biases = lin.get("biases")
    out: mx.array = mx.quantized_matmul(
        a,
        lin.weight[e],
        lin.scales[e],
        None if biases is None else biases[e],
        transpose=True,
        group_size=lin.group_size,
        bits=lin.bits,
        mode=lin.mode,
    )
    return out + lin["bias"][e] if lin.get("bias") is not None else out


def run_by_expert(switch: FusedSwitchGLU, x: mx.array, inds: np.ndarray) -> mx.array:
    """switch(x, inds) -> [T, k, D], computed one expert at a time: the (token, slot) pairs
    sorted by expert on the host, one quantized matmul per expert over its contiguous rows.

    `inds` [T, k] is the router's choice on the host (one sync per layer: large batches only). For
    a prefill batch this reads each expert's weights once per layer, where MLX's CUDA `gather_qmm`
    runs row by row."""
    T, k = inds.shape
    flat = inds.reshape(-1)
    order = np.argsort(flat, kind="stable")
    experts, starts = np.unique(flat[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    xs = x[mx.array(order // k, mx.int32)]  # [T*k, D], rows grouped by expert
    outs = []
    for e, a, b in zip(experts.tolist(), starts.tolist(), ends.tolist(), strict=True):
        gate, up = mx.split(_expert_matmul(switch.gate_up, xs[a:b], e), [switch.hidden], axis=-1)
        outs.append(_expert_matmul(switch.down_proj, switch.activation(up, gate), e))
    ys = mx.concatenate(outs, axis=0)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return ys[mx.array(inverse, mx.int32)].reshape(T, k, -1)
