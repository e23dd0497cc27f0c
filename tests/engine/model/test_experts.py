"""The engine's routed experts (server/engine/model/experts.py) compute what mlx-lm's SwitchGLU does."""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

from server.engine.model.experts import FusedSwitchGLU, fuse_experts, pays_one_at_a_time, run_by_expert

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

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
    got = run_by_expert(FusedSwitchGLU(copy.deepcopy(glu)), x, np.asarray(inds))
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


def test_one_at_a_time_needs_a_dozen_rows_for_each_expert_the_router_chose() -> None:
    """A launch per active expert against a share per row (H100, docs/serving.md): 256 rows over
    32 experts (8 each) run gathered, 512 over 32 (16 each) one at a time, 512 spread over all 128
    (4 each) gathered again; "on" forces it."""
    spread = np.arange(512).reshape(128, 4) % 128
    assert not pays_one_at_a_time(np.arange(256).reshape(64, 4) % 32, "auto")
    assert pays_one_at_a_time(np.arange(512).reshape(128, 4) % 32, "auto")
    assert not pays_one_at_a_time(spread, "auto") and pays_one_at_a_time(spread, "on")


def test_the_engine_gives_the_same_tokens_one_expert_at_a_time() -> None:
    """The demo model with INT4 experts: `--moe-by-expert on` (the runner's sort, sync and one
    product per expert) and `off` (gather_qmm) decode the same greedy tokens."""
    from mlx_lm.models.switch_layers import SwitchLinear
    from support.engine_harness import make_engine, prompt, run_until_idle, submit

    from server.engine.factory import engine_model
    from server.engine.model.demo_model import ensure_demo_model
    from server.engine.model.loader import load_model

    model, _ = load_model(str(ensure_demo_model()))
    nn.quantize(model, group_size=64, bits=4, class_predicate=lambda _, m: isinstance(m, SwitchLinear))
    model = engine_model(model)
    outputs = []
    for mode in ("on", "off"):
        engine = make_engine(num_blocks=64, model=model, moe_by_expert=mode)
        got = [submit(engine, f"r{i}", prompt(40 + 30 * i, seed=i), max_tokens=8, ignore_eos=True) for i in range(3)]
        run_until_idle(engine)
        outputs.append([c.token_ids for c in got])
    assert outputs[0] == outputs[1] and all(len(t) == 8 for t in outputs[0])
