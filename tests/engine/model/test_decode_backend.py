"""The decode backend is the engine's own: chosen by its factory (`--decode-backend`, then the
start-up check's verdict), held by its model runner and shown by /health; no process-wide choice."""

from __future__ import annotations

from collections import Counter
from typing import Any

import mlx.core as mx
import pytest
from support.engine_harness import demo_engine_model, make_engine, prompt, run_until_idle, submit
from support.platforms import pretend

from server.kernels import mla_decode, selfcheck

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many decode calls each plain-MLX backend ran."""
    calls: Counter[str] = Counter()
    for backend, name in (("cpu", "mla_decode_append_cpu"), ("reference", "mla_decode_append_reference")):
        real = getattr(mla_decode, name)

        def counted(*args: Any, _real: Any = real, _backend: str = backend) -> mx.array:
            calls[_backend] += 1
            return _real(*args)

        monkeypatch.setattr(mla_decode, name, counted)
    return calls


def test_two_engines_in_one_process_each_decode_through_their_own(decoded: Counter[str]) -> None:
    engines = {backend: make_engine(decode_backend=backend) for backend in ("cpu", "reference")}
    for backend, engine in engines.items():
        assert engine.runner.decode_backend == backend
        assert engine.stats()["decode"]["backend"] == backend
        submit(engine, "a", prompt(20), max_tokens=4, ignore_eos=True)
    for engine in engines.values():  # the first steps prefill: nothing decodes yet
        engine.step()
    for backend, engine in engines.items():
        decoded.clear()
        engine.step()
        assert set(decoded) == {backend}, (backend, decoded)


def test_a_kernel_that_fails_its_check_leaves_the_engine_on_the_reference(
    monkeypatch: pytest.MonkeyPatch, decoded: Counter[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> mx.array:
        raise RuntimeError("nvrtc: error: identifier 'uint' is undefined")

    demo_engine_model()  # as this machine runs it
    pretend(monkeypatch, "cuda")
    monkeypatch.setattr(selfcheck, "mla_decode_append_fused", broken)
    engine = make_engine(warmup="off")
    assert engine.runner.decode_backend == "reference"
    assert {k: engine.decode[k] for k in ("backend", "checked", "ok")} == {
        "backend": "reference",
        "checked": "cuda",
        "ok": False,
    }
    decoded.clear()
    out = submit(engine, "a", prompt(20), max_tokens=4, ignore_eos=True)
    run_until_idle(engine)
    assert len(out.token_ids) == 4 and set(decoded) == {"reference"}
