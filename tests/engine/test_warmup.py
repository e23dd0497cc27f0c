"""Warm-up before ready (server/engine/warmup.py): the compile workers and their kernel caches."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.switch_layers import SwitchLinear
from support.engine_harness import ScriptedRunner, demo_engine_model, demo_model, make_engine
from support.platforms import pretend

from server.engine import warmup
from server.engine.args import EngineArgs
from server.engine.factory import engine_model, load_engine
from server.engine.model.architectures import adapt_model
from server.engine.model.demo_model import ensure_demo_model
from server.engine.model.loader import load_model
from server.engine.types import SamplingParams

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset


def greedy(engine, prompt: list[int], n: int = 6) -> list[int]:
    return engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0))[0].token_ids


def test_warmup_units_stay_few_and_within_the_limits():
    units = warmup.warmup_units(EngineArgs(max_num_seqs=48, prefill_chunk_size=512), 4096)
    assert units == [f"prefill:{n}" for n in (16, 128, 512)] + [f"decode:{b}" for b in (1, 2, 4, 8, 16, 32)]
    units = warmup.warmup_units(EngineArgs(max_num_seqs=64, prefill_chunk_size=300), 200)
    assert [u for u in units if u.startswith("prefill")] == ["prefill:16", "prefill:128", "prefill:198"]


def test_one_layer_per_kind_keeps_the_first_layer_of_each_kind_and_runs():
    model, tok = load_model(str(ensure_demo_model()), one_layer_per_kind=True)
    # The demo model: one dense layer, then three MoE layers of one kind.
    assert len(model.model.layers) == 2
    assert not hasattr(model.model.layers[0].mlp, "gate") and hasattr(model.model.layers[1].mlp, "gate")
    engine = load_engine(EngineArgs(max_num_seqs=4, cache_tokens=64 * 8, warmup="off"), (engine_model(model), tok))
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    assert len(engine.generate([[5, 9, 13, 200, 17]], params)[0].token_ids) == 3


class EosRunner(ScriptedRunner):
    """A model that draws EOS whenever it can."""

    def run(self, plan) -> mx.array:
        rows = super().run(plan).shape[0]
        return mx.broadcast_to(
            mx.where(mx.arange(self.vocab_size) == demo_model()[1].eos_token_id, 10.0, 0.0), (rows, self.vocab_size)
        )


@pytest.mark.parametrize("model", ["demo", "eos"])
def test_warm_up_runs_every_units_step_shape_through_the_runner(model):
    """Each `prefill:N` unit a step that prefills one chunk of exactly N tokens, each `decode:B` a
    step that decodes B sequences together, also where the model would end every output at once
    (and no step is built before the last one's draws are back); every step counted, and nothing
    left running."""
    args = dict(max_num_seqs=8, prefill_chunk_size=128, warmup="off")
    if model == "demo":
        engine = load_engine(EngineArgs(cache_tokens=64 * 16, **args), demo_engine_model())
    else:
        engine = make_engine(num_blocks=16, runner=EosRunner(), async_scheduling="off", **args)
    units = warmup.warmup_units(engine.args, engine.max_model_len)
    assert units == ["prefill:16", "prefill:128", "decode:1", "decode:2", "decode:4", "decode:8"]
    shapes = []
    run = engine.runner.run

    def recording(plan):
        shapes.append((len(plan.decodes), [n for _, n in plan.prefills]))
        return run(plan)

    engine.runner.run = recording
    steps = warmup.warm_up(engine, units)
    for unit in units:
        kind, n = unit.split(":")
        assert ((0, [int(n)]) if kind == "prefill" else (int(n), [])) in shapes, unit
    assert steps == len(shapes) == engine.counters["steps"]
    assert not engine.has_work and engine.blocks.num_free == len(engine.blocks.blocks)


def test_compile_workers_run_every_unit_and_the_engine_still_serves(caplog, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "kernels"))  # empty: a fresh machine
    caplog.set_level(logging.INFO, logger="server.engine.warmup")
    args = EngineArgs(max_num_seqs=2, cache_tokens=64 * 16, prefill_chunk_size=128, warmup="on", warmup_workers=2)
    engine = load_engine(args)
    done = " ".join(r.getMessage() for r in caplog.records if "compile worker done" in r.getMessage())
    for unit in warmup.precompile_units():
        assert f"{unit} " in done
    plain = load_engine(EngineArgs(max_num_seqs=2, cache_tokens=64 * 16, prefill_chunk_size=128, warmup="off"))
    prompt = [5, 9, 13, 200, 17]
    assert greedy(engine, prompt) == greedy(plain, prompt)


def test_no_workers_on_a_warm_kernel_cache_or_without_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path))
    (tmp_path / "gather_bfloat16_int32_1.ptx").write_text("compiled before")
    with warmup.Precompile.start(EngineArgs(warmup_workers=2), str(ensure_demo_model())) as pre:
        assert pre.workers == []
    with warmup.Precompile.start(EngineArgs(warmup_workers=2), None) as pre:
        assert pre.workers == []


def test_never_more_workers_than_units(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "kernels"))
    with warmup.Precompile.start(EngineArgs(warmup_workers=10), str(ensure_demo_model())) as pre:
        assert len(pre.workers) == len(warmup.precompile_units())
        assert all(len(w.units) == 1 for w in pre.workers)


@pytest.mark.parametrize("backend, some", [("cuda", True), ("metal", False), ("cpu", False)])
def test_workers_are_only_the_default_on_cuda(monkeypatch, tmp_path, backend, some):
    pretend(monkeypatch, backend, memory=80 << 30)
    monkeypatch.setattr(warmup.os, "cpu_count", lambda: 16)
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 8}')
    assert warmup.compile_workers(EngineArgs(warmup_workers=3), tmp_path) == 3
    assert (warmup.compile_workers(EngineArgs(), tmp_path) > 0) == some


@pytest.mark.parametrize("backend, warms", [("cuda", True), ("metal", True), ("cpu", False)])
def test_auto_warms_up_on_a_gpu_only(monkeypatch, backend, warms):
    from support.engine_harness import demo_engine_model, make_engine

    from server.engine import factory

    demo_engine_model()  # as this machine runs it
    pretend(monkeypatch, backend)
    ran = []
    monkeypatch.setattr(factory, "warm_up", lambda engine, units: ran.append(units) or 0)
    make_engine(decode_backend="cpu")  # --warmup auto; no start-up check to run
    assert bool(ran) == warms


def test_on_cuda_the_worker_count_follows_cores_and_memory(monkeypatch, tmp_path):
    pretend(monkeypatch, "cuda", memory=80 << 30)
    monkeypatch.setattr(warmup.os, "cpu_count", lambda: 16)
    assert warmup.compile_workers(EngineArgs(), tmp_path) == 0  # no config.json: the loader will say why
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 8}')
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    os.truncate(weights, 15 << 30)  # sparse: an 8-layer model of 15 GiB
    assert warmup.compile_workers(EngineArgs(), tmp_path) == 9  # 54 GiB left, 5.75 GiB a worker
    monkeypatch.setattr(warmup.os, "cpu_count", lambda: 4)
    assert warmup.compile_workers(EngineArgs(), tmp_path) == 3  # one core stays with the server
    os.truncate(weights, 60 << 30)  # the model leaves no room for a worker's layers
    assert warmup.compile_workers(EngineArgs(), tmp_path) == 0


def test_matmul_units_cover_every_quantized_matrix_once_per_family():
    model, _ = load_model(str(ensure_demo_model()), one_layer_per_kind=True)
    linear = (nn.Linear, SwitchLinear)
    nn.quantize(model, 64, 4, class_predicate=lambda _, m: isinstance(m, linear) and m.weight.shape[-1] % 64 == 0)
    model = adapt_model(model)  # experts stacked as the engine runs them
    matrices = warmup.quantized_matrices(model)
    assert matrices and all(w.ndim == 2 for w, *_ in matrices)
    n128 = warmup.run_matmuls(model, 16, "n128", mx.float32)
    other = warmup.run_matmuls(model, 16, "other", mx.float32)
    assert n128 > 0 and other > 0 and n128 + other == len(matrices)


def test_merge_adds_what_is_missing_kernel_file_last_and_keeps_what_is_there(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    dst.mkdir()
    for name in ["a.ptx", "a.txt", "a.cu", "sub/b.ptx", "sub/b.txt", "c.ptx"]:
        (src / name).write_text("new " + name)
    (dst / "c.ptx").write_text("old")
    renamed: list[str] = []
    real = os.replace

    def record(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        renamed.append(Path(b).name)
        real(a, b)

    monkeypatch.setattr(warmup.os, "replace", record)
    assert warmup._merge(src, dst) == 5
    assert (dst / "c.ptx").read_text() == "old"
    assert (dst / "sub" / "b.ptx").read_text() == "new sub/b.ptx"
    assert renamed.index("a.ptx") > max(renamed.index("a.txt"), renamed.index("a.cu"))
    assert renamed.index("b.ptx") > renamed.index("b.txt")
    assert not [f for f in dst.rglob("*.part")]


def test_a_failed_worker_is_logged_and_its_files_are_not_merged(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "shared"))
    (tmp_path / "shared").mkdir()
    cache = tmp_path / "w"
    cache.mkdir()
    (cache / "half.ptx").write_text("trunc")
    output = (tmp_path / "log").open("w+b")
    proc = subprocess.Popen([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], stdout=output)
    caplog.set_level(logging.INFO, logger="server.engine.warmup")
    with warmup.Precompile([warmup._Worker(proc, cache, ["decode:1"], output)], None) as pre:
        pre.join()
    assert any("ended with 3" in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "shared" / "half.ptx").exists()


def test_leaving_early_stops_the_workers(tmp_path):
    output = (tmp_path / "log").open("w+b")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=output)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(RuntimeError), warmup.Precompile([warmup._Worker(proc, tmp_path, ["check"], output)], scratch):
        raise RuntimeError("the model failed to load")
    assert proc.poll() is not None and not scratch.exists()


def test_a_worker_ends_when_the_server_that_started_it_is_killed(tmp_path):
    # The middle process stands in for the server: it starts a "worker" that watches it, then dies.
    pidfile = tmp_path / "worker.pid"
    worker = (
        "import os, time; from server.engine.warmup import exit_with_parent; exit_with_parent(); "
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    server = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", server])
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the worker outlived its server"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True
