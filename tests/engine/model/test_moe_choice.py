"""How the model runner runs a step's routed experts: one expert at a time or through gather_qmm."""

from __future__ import annotations

import mlx.core as mx
import pytest
from support.platforms import pretend

from server.engine.model.architectures import adapt_model
from server.engine.model.demo_model import ensure_demo_model
from server.engine.model.loader import load_model


def test_experts_go_one_at_a_time_from_three_rows_each_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_by_expert` under "auto": measured on the H100, 2 rows per expert ran faster through
    gather_qmm and 4 one expert at a time (docs/serving.md)."""
    from server.engine.model import experts as moe

    model = adapt_model(load_model(str(ensure_demo_model()))[0])
    mlp = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "switch_mlp"))
    experts, k = mlp.switch_mlp.down_proj.weight.shape[0], mlp.num_experts_per_tok
    monkeypatch.setitem(mlp.switch_mlp.down_proj, "scales", mx.zeros((1,)))  # as if quantized
    pretend(monkeypatch, "cuda")
    rows_3 = -(-3 * experts // k)  # fewest tokens giving 3 rows per expert
    assert moe.by_expert(mlp, rows_3, "auto")
    assert not moe.by_expert(mlp, rows_3 - 1, "auto")
    assert moe.by_expert(mlp, 1, "on") and not moe.by_expert(mlp, 10**6, "off")
