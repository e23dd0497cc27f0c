"""Independent parts of a CPU step on several CPU streams (server/kernels/cpu_streams.py): the
same results as one call, in order, wherever the engine splits (decode batch, prefill query
blocks, MLP tokens)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from server.engine.factory import engine_model
from server.engine.model.demo_model import ensure_demo_model
from server.engine.model.loader import load_model
from server.engine.model.model_runner import MLP_PART_MIN_TOKENS, ModelRunner
from server.kernels import cpu_streams

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU backend's streams")


def test_parts_come_back_in_order_with_their_values() -> None:
    parts = [lambda i=i: mx.arange(4) * i for i in range(5)]
    outs = cpu_streams.run_parts(parts)
    assert [o.tolist() for o in outs] == [[0, i, 2 * i, 3 * i] for i in range(5)]


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    model, _ = load_model(str(ensure_demo_model()))
    return ModelRunner(engine_model(model), num_blocks=8, decode_backend="cpu")


def test_mlp_in_parts_equals_one_call(runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    if cpu_streams.num_cpu_streams() < 2:
        pytest.skip("one core: the MLP runs in one part")
    x = mx.random.normal((3 * MLP_PART_MIN_TOKENS + 5, runner.model.args.hidden_size), key=mx.random.key(0))
    for layer in runner.inner.layers[:2]:  # the demo's dense first layer, then an MoE layer
        split = runner._mlp(layer.mlp, x, None)
        monkeypatch.setattr(runner, "mlp_parts", 1)
        whole = runner._mlp(layer.mlp, x, None)
        monkeypatch.undo()
        assert mx.allclose(split, whole, rtol=1e-5, atol=1e-6).item()


def test_a_sharded_model_keeps_its_mlp_in_one_call() -> None:
    model, _ = load_model(str(ensure_demo_model()))
    assert ModelRunner(engine_model(model), num_blocks=8, decode_backend="cpu", sharded=True).mlp_parts == 1
