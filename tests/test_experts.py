"""The engine's routed experts (server/engine/experts.py) compute what mlx-lm's SwitchGLU does."""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

from server.engine.experts import FusedSwitchGLU, fuse_experts, run_by_expert

D, HIDDEN, EXPERTS, K = 128, 64, 8, 2


def switch_glu(quantized: bool) -> SwitchGLU:
    mx.random.seed(0)
    glu = SwitchGLU(D, HIDDEN, EXPERTS)
    if quantized:
        nn.quantize(glu, group_size=64, bits=4)
    mx.eval(glu.parameters())
    return glu


def routed(tokens: int) -> tuple[mx.array, mx.array]:
    x = mx.random.normal((tokens, D))
    inds = mx.stack([mx.random.permutation(EXPERTS)[:K] for _ in range(tokens)]).astype(mx.uint32)
    return x, inds


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int4"])
@pytest.mark.parametrize("tokens", [3, 40], ids=["gathered", "sorted"])  # 40 x 2 >= 64: sorted
def test_stacked_gate_and_up_give_the_same_outputs(quantized: bool, tokens: int) -> None:
    glu = switch_glu(quantized)
    x, inds = routed(tokens)
    want = glu(x, inds)
    fused = FusedSwitchGLU(copy.deepcopy(glu))
    assert fused.gate_up.weight.shape[1] == 2 * glu.gate_proj.weight.shape[1]
    assert mx.array_equal(fused(x, inds), want)  # each output is the same dot product


def test_one_expert_at_a_time_matches_the_gathered_product() -> None:
    glu = switch_glu(quantized=True)
    x, inds = routed(50)
    want = glu(x, inds)
    got = run_by_expert(FusedSwitchGLU(copy.deepcopy(glu)), x, inds)
    assert got.shape == want.shape
    assert mx.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_every_switch_mlp_of_a_model_is_fused_once() -> None:
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.switch_mlp = switch_glu(quantized=True)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = [Layer(), Layer()]

    model = Model()
    assert fuse_experts(model) == 2
    assert all(isinstance(layer.switch_mlp, FusedSwitchGLU) for layer in model.layers)
    assert fuse_experts(model) == 0
