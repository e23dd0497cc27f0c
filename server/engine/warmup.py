"""Warm-up before ready: every step shape the engine will use runs once before /health says
ready, so MLX compiles its kernels first; on CUDA, worker processes compile the costliest of
them in parallel beforehand.

    units = warmup_units(args, max_model_len)    # ["prefill:16", ..., "decode:1", "decode:2", ...]
    steps = warm_up(engine, units)               # through engine.generate, in this process
    with Precompile.start(args, model) as pre:   # compile workers, while this process loads
        ...
        pre.join()                               # wait; their kernels join this process's cache

Why workers, and which: MLX's CUDA backend compiles each kernel module with NVRTC on its first
use, one after another on one host core, and keeps it on disk (MLX_PTX_CACHE_DIR, default
$TMPDIR/mlx/<version>/ptx) for every later process. A fresh H200 machine spent about 220 s of
a 250 s start compiling 20 modules for the 8-layer Mistral-Small-4-shaped model (docs/serving.md);
six of them, the quantized matrix products (one per row tile, 16, 32 or 64 rows, and per kernel
family, which MLX picks by whether the output width is a multiple of 128), took 18-37 s each, the
self-check's gathers and scatters about 26 s together. Running whole warm-up units in parallel gained little (each
unit compiles most modules again), so each worker runs one targeted unit: the self-check, or the
model's quantized matrices of one family at one row tile. Those names mirror MLX's kernel choice
only to split the work: a wrong guess costs time, never correctness, since this process's own
warm-up then compiles whatever is missing. Workers start only when the kernel cache is empty (a
warm machine has nothing to gain), load the model with one layer of each kind (the same shapes,
in a fraction of the memory), and compile into directories of their own: MLX writes a cache
file in place, so a process reading a file that another is still writing could load a truncated
kernel. A finished worker's files are moved into the shared directory by renames, each module's
kernel file last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import mlx.core as mx
from mlx.core import __version__ as MLX_VERSION  # type: ignore[attr-defined]

from ..platform import current_platform
from .args import EngineArgs
from .types import SamplingParams

if TYPE_CHECKING:
    from .llm_engine import LLMEngine

log = logging.getLogger(__name__)

CHECK = "check"  # the unit that runs the start-up self-check of the fused decode kernel
MATMUL_ROW_TILES = (16, 32, 64)  # the row tiles of MLX's CUDA quantized matrix products (0.32)
UNIT_DONE = "unit done:"  # how a worker reports a unit, with its seconds
WORKER_OVERHEAD = 2 << 30  # bytes a worker holds beside its layers: context, embeddings, buffers
WORKER_TIMEOUT_S = 900.0


def warmup_units(args: EngineArgs, max_model_len: int) -> list[str]:
    """The warm-up's units: a prefill of each chunk length in {16, 128, 512, 2048} up to the
    engine's limits, then a decode at each batch size 1, 2, 4, ... up to `max_num_seqs`: the shapes
    most steps take, few enough to run at every start."""
    longest = min(args.prefill_chunk, args.max_num_batched_tokens, max_model_len - 2)
    chunks = sorted({c for c in (16, 128, 512, 2048) if c <= longest} | {max(1, longest)})
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= args.max_running]
    return [f"prefill:{n}" for n in chunks] + [f"decode:{b}" for b in batches]


def warm_up(engine: LLMEngine, units: list[str]) -> int:
    """Run each unit through the engine's own steps, one after another; the steps it took.
    `prefill:N` is one prompt of N tokens (a first chunk of N, then a decode step), `decode:B`
    B prompts of 8 tokens that decode three steps together; EOS ends none of them early."""
    vocab = engine.runner.vocab_size
    first = engine.counters["steps"]
    for unit in units:
        kind, size = unit.split(":")
        n = int(size)
        lengths, max_tokens = ([n], 2) if kind == "prefill" else ([8] * n, 4)
        prompts = [[(7 + 31 * seed + 17 * i) % vocab for i in range(length)] for seed, length in enumerate(lengths)]
        t0, before = time.perf_counter(), engine.counters["steps"]
        engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        # First uses compile kernels on MLX's GPU backends: this line says what a shape costs.
        log.info("warm-up %s: %d steps in %.1f s", unit, engine.counters["steps"] - before, time.perf_counter() - t0)
    return engine.counters["steps"] - first


def kernel_cache_dir() -> Path:
    """Where MLX's CUDA backend keeps compiled kernels (mlx/backend/cuda/jit_module.cpp)."""
    return Path(os.environ.get("MLX_PTX_CACHE_DIR") or Path(tempfile.gettempdir()) / "mlx" / MLX_VERSION / "ptx")


def precompile_units() -> list[str]:
    """The compile workers' units: the start-up self-check, then the quantized matrix products of
    each kernel family ("n128": output width a multiple of 128; "other") at each row tile."""
    return [CHECK] + [f"matmul:{rows}:{family}" for rows in MATMUL_ROW_TILES for family in ("n128", "other")]


def compile_workers(args: EngineArgs, model_dir: Path) -> int:
    """How many compile workers to start: `args.warmup_workers`, else on CUDA (`platform.DEFAULTS`)
    as many as the host's cores and the device's memory allow (the model, then per worker twice a
    layer's weights plus `WORKER_OVERHEAD`); elsewhere none (MLX's Metal kernels ship mostly
    precompiled in its library; on the CPU there is no warm-up by default)."""
    if args.warmup_workers is not None:
        return args.warmup_workers
    platform = current_platform()
    if not platform.defaults.compile_workers:
        return 0
    try:
        layers = max(1, int(json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers", 1)))
    except (OSError, ValueError, AttributeError):
        return 0  # not a model directory: the loader says so, in words a user can act on
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    by_memory = int((0.9 * platform.memory - 1.2 * weights) // (2 * weights / layers + WORKER_OVERHEAD))
    return max(0, min((os.cpu_count() or 1) - 1, by_memory))


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    cache: Path
    units: list[str]
    output: IO[bytes]


class Precompile:
    """Compile workers (see the module's docstring); a context manager that stops any still
    running when it is left, and removes their directories."""

    def __init__(self, workers: list[_Worker], scratch: Path | None) -> None:
        self.workers = workers
        self.scratch = scratch

    @classmethod
    def start(cls, args: EngineArgs, model: str | None) -> Precompile:
        """Start the workers for `model` (a local directory or a downloaded repo id; None: none)."""
        shared = kernel_cache_dir()
        if model is None or (shared.is_dir() and any(shared.iterdir())):
            return cls([], None)
        units = precompile_units()
        count = min(compile_workers(args, _model_dir(model)), len(units))  # more would have nothing to do
        if count <= 0:
            return cls([], None)
        shared.mkdir(parents=True, exist_ok=True)
        os.environ["MLX_PTX_CACHE_DIR"] = str(shared)  # this process reads where the merge writes
        scratch = Path(tempfile.mkdtemp(prefix="mla-precompile-"))
        workers = []
        for i in range(count):
            cache = scratch / f"cache{i}"
            share = units[i::count]
            output = (scratch / f"worker{i}.log").open("w+b")
            proc = subprocess.Popen(
                [sys.executable, "-m", __name__, json.dumps(asdict(replace(args, model=model))), ",".join(share)],
                env={**os.environ, "MLX_PTX_CACHE_DIR": str(cache)},
                stdout=output,
                stderr=subprocess.STDOUT,
            )
            workers.append(_Worker(proc, cache, share, output))
        log.info("warm-up: %d compile workers started (%s)", count, "; ".join(",".join(w.units) for w in workers))
        return cls(workers, scratch)

    def join(self) -> None:
        """Wait for the workers; move the kernels of each that succeeded into the shared cache."""
        if not self.workers:
            return
        t0 = time.perf_counter()
        added = 0
        for w in self.workers:
            try:
                code = w.proc.wait(timeout=max(1.0, WORKER_TIMEOUT_S - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                code = w.proc.wait()
            w.output.seek(0)
            lines = w.output.read().decode(errors="replace").strip().splitlines()
            if code != 0:  # this process's own warm-up compiles what the worker did not
                log.warning("warm-up: compile worker for %s ended with %s:\n%s", w.units, code, "\n".join(lines[-8:]))
                continue
            added += _merge(w.cache, kernel_cache_dir())
            log.info(
                "warm-up: compile worker done: %s", "; ".join(line for line in lines if line.startswith(UNIT_DONE))
            )
        log.info(
            "warm-up: compile workers joined after %.1f s more; %d new kernel files", time.perf_counter() - t0, added
        )

    def __enter__(self) -> Precompile:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
            w.output.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _model_dir(model: str) -> Path:
    local = Path(model).expanduser()
    if local.exists():
        return local
    from mlx_lm.utils import hf_repo_to_path  # already downloaded by `load_model`

    return Path(hf_repo_to_path(model))  # type: ignore[no-untyped-call]


def _merge(src: Path, dst: Path) -> int:
    """Move the files of `src` that `dst` lacks into it, each by a rename (a reader sees a whole
    file or none); a kernel file (.ptx) after the rest of its module, since MLX reads the module
    once the kernel file exists. The files moved."""
    moved = 0
    for f in sorted((f for f in src.rglob("*") if f.is_file()), key=lambda f: f.suffix == ".ptx"):
        to = dst / f.relative_to(src)
        if to.exists():
            continue
        to.parent.mkdir(parents=True, exist_ok=True)
        part = to.with_name(f".{to.name}.{os.getpid()}.part")
        shutil.copy2(f, part)
        os.replace(part, to)
        moved += 1
    return moved


def quantized_matrices(model: Any) -> list[tuple[mx.array, mx.array, mx.array | None, int, int, str]]:
    """(weight, scales, biases, group size, bits, mode) of each quantized matrix of `model`; of a
    stack of experts' matrices, the first expert's."""
    found = []
    for _, module in model.named_modules():
        if "scales" not in module or not hasattr(module, "bits"):
            continue
        w, scales, biases = module["weight"], module["scales"], module.get("biases")
        if w.ndim == 3:
            w, scales, biases = w[0], scales[0], None if biases is None else biases[0]
        found.append((w, scales, biases, module.group_size, module.bits, getattr(module, "mode", "affine")))
    return found


def run_matmuls(model: Any, rows: int, family: str, dtype: mx.Dtype) -> int:
    """Multiply `rows` rows by each of the model's quantized matrices of `family`; how many."""
    done = 0
    for w, scales, biases, group_size, bits, mode in quantized_matrices(model):
        n, k = w.shape[0], w.shape[1] * 32 // bits
        if ("n128" if n % 128 == 0 else "other") != family:
            continue
        x = mx.zeros((rows, k), dtype)
        mx.eval(mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode))
        done += 1
    return done


def exit_with_parent() -> None:
    """End this process as soon as its parent is gone (the server killed while it warms up, before
    `Precompile` could stop its workers): a daemon thread polls the parent's pid once a second."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker(argv: list[str]) -> None:
    """A compile worker: `python -m server.engine.warmup ARGS_JSON UNIT,UNIT,...`."""
    exit_with_parent()
    from .model.architectures import adapt_model
    from .model.loader import load_model
    from .model.model_runner import cache_dtype, check_decode

    logging.basicConfig(level=logging.WARNING)
    args = EngineArgs(**json.loads(argv[0]))
    assert args.model is not None
    model = adapt_model(load_model(args.model, one_layer_per_kind=True)[0])
    for unit in argv[1].split(","):
        t0 = time.perf_counter()
        if unit == CHECK:
            check_decode(model, args)
        else:
            _, rows, family = unit.split(":")
            run_matmuls(model, int(rows), family, cache_dtype(model))
        print(f"{UNIT_DONE} {unit} {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1:])
