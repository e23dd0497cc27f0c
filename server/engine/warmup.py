"""Warm-up before ready: every step shape the engine will use runs once before /health says
ready, so MLX compiles its kernels first; on CUDA, worker processes compile them in parallel.

    units = warmup_units(args, max_model_len)    # ["prefill:16", ..., "decode:1", "decode:2", ...]
    steps = warm_up(engine, units)               # through engine.step, in this process
    with Precompile.start(args, model) as pre:   # compile workers, while this process loads
        ...
        pre.join()                               # wait; their kernels join this process's cache

Why workers: MLX's CUDA backend compiles each kernel with NVRTC on its first use, one after
another on one host core: a fresh H100 machine needed 255-279 s before ready (docs/serving.md).
MLX keeps compiled kernels on disk (MLX_PTX_CACHE_DIR, default $TMPDIR/mlx/<version>/ptx) for
every later process, so workers that each run a share of the units (the start-up self-check
among them) compile in parallel, and this process's own warm-up then only loads their kernels.
Each worker loads the model with one layer of each kind (the same shapes, so the same kernels,
in a fraction of the memory) and compiles into a directory of its own, seeded with links to the
shared one (a warm cache stays warm): MLX writes a cache file in place, so a process reading a
file that another is still writing could load a truncated kernel. A finished worker's new files
are moved into the shared directory by renames, its mangled-name list before its kernel file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

import mlx.core as mx
from mlx.core import __version__ as MLX_VERSION  # type: ignore[attr-defined]

from .args import EngineArgs
from .sequence import Sequence
from .types import SamplingParams

if TYPE_CHECKING:
    from .llm_engine import LLMEngine

log = logging.getLogger(__name__)

CHECK = "check"  # the unit that runs the start-up self-check of the fused decode kernel
MAX_WORKERS = 8  # on the H100 machine the units' compile times are uneven: more would idle
WORKER_OVERHEAD = 2 << 30  # bytes a worker holds beside its layers: context, embeddings, buffers
WORKER_TIMEOUT_S = 900.0


def warmup_units(args: EngineArgs, max_model_len: int) -> list[str]:
    """The warm-up's units: a prefill of each chunk length in {16, 128, 512, 2048} up to the
    engine's limits, then a decode at each batch size 1, 2, 4, ... up to `max_num_seqs`: the shapes
    most steps take, few enough to run at every start."""
    longest = min(args.prefill_chunk_size, args.max_num_batched_tokens, max_model_len - 2)
    chunks = sorted({c for c in (16, 128, 512, 2048) if c <= longest} | {max(1, longest)})
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= args.max_running]
    return [f"prefill:{n}" for n in chunks] + [f"decode:{b}" for b in batches]


def warm_up(engine: LLMEngine, units: list[str]) -> int:
    """Run each unit through the engine's own step, one after another; the steps it took."""
    vocab = engine.runner.vocab_size
    steps = 0

    def submit(rid: str, n: int, max_tokens: int) -> None:
        ids = [(7 + 31 * len(rid) + 17 * i) % vocab for i in range(n)]
        engine.add(Sequence(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), emit=lambda item: None))

    for unit in units:
        kind, size = unit.split(":")
        n = int(size)
        if kind == "prefill":  # a first chunk of n tokens, then a decode step
            submit(f"warm-prefill-{n}", n + 1, 2)
        else:  # n sequences that decode in the same steps
            for i in range(n):
                submit(f"warm-decode-{n}-{i}", 8, 4)
        t0, before = time.perf_counter(), steps
        while engine.has_work:
            engine.step()
            steps += 1
        # First uses compile kernels on MLX's GPU backends: this line says what a shape costs.
        log.info("warm-up %s: %d steps in %.1f s", unit, steps - before, time.perf_counter() - t0)
    return steps


def kernel_cache_dir() -> Path:
    """Where MLX's CUDA backend keeps compiled kernels (mlx/backend/cuda/jit_module.cpp)."""
    return Path(os.environ.get("MLX_PTX_CACHE_DIR") or Path(tempfile.gettempdir()) / "mlx" / MLX_VERSION / "ptx")


def compile_workers(args: EngineArgs, model_dir: Path) -> int:
    """How many compile workers to start: `args.warmup_workers`, else on CUDA as many as the host's
    cores and the device's memory allow (the model, then per worker twice a layer's weights plus
    `WORKER_OVERHEAD`), at most `MAX_WORKERS`; elsewhere none (Metal compiles in seconds)."""
    if args.warmup_workers is not None:
        return args.warmup_workers
    if not (mx.default_device() == mx.gpu and mx.cuda.is_available()):
        return 0
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    layers = max(1, int(json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers", 1)))
    memory = int(mx.device_info().get("memory_size", 0))
    by_memory = int((0.9 * memory - 1.2 * weights) // (2 * weights / layers + WORKER_OVERHEAD))
    return max(0, min(MAX_WORKERS, (os.cpu_count() or 1) - 1, by_memory))


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
        if model is None:
            return cls([], None)
        model_dir = _model_dir(model)
        count = compile_workers(args, model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        limit = args.max_model_len or int(config.get("max_position_embeddings", 2**20))
        units = [CHECK, *warmup_units(args, limit)]
        count = min(count, len(units))
        if count <= 0:
            return cls([], None)
        shared = kernel_cache_dir()
        shared.mkdir(parents=True, exist_ok=True)
        os.environ["MLX_PTX_CACHE_DIR"] = str(shared)  # this process reads where the merge writes
        scratch = Path(tempfile.mkdtemp(prefix="mla-precompile-"))
        longest = max(int(u.split(":")[1]) for u in units if u.startswith("prefill:"))
        blocks = args.max_running + -(-(longest + 3) // args.block_size) + 2
        worker_args = replace(
            args,
            model=model,
            cache_tokens=blocks * args.block_size,
            max_model_len=min(limit, blocks * args.block_size),
            warmup="off",
            warmup_workers=0,
        )
        workers = []
        for i in range(count):
            cache = scratch / f"cache{i}"
            _link_tree(shared, cache)
            share = units[i::count]  # round robin: the costly units (check, prefills, small batches) spread
            output = (scratch / f"worker{i}.log").open("w+b")
            proc = subprocess.Popen(
                [sys.executable, "-m", __name__, json.dumps(asdict(worker_args)), ",".join(share)],
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
            tail = w.output.read().decode(errors="replace").strip().splitlines()[-8:]
            if code != 0:  # this process's own warm-up compiles what the worker did not
                log.warning("warm-up: compile worker for %s ended with %s:\n%s", w.units, code, "\n".join(tail))
                continue
            added += _merge(w.cache, kernel_cache_dir())
            log.info("warm-up: compile worker done: %s", "; ".join(tail))
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


def _link_tree(src: Path, dst: Path) -> None:
    """`dst` holds every file of `src`, as hard links where the file system allows."""
    for f in src.rglob("*"):
        if f.is_file():
            to = dst / f.relative_to(src)
            to.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, to)
            except OSError:
                shutil.copy2(f, to)
    dst.mkdir(parents=True, exist_ok=True)


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


def _worker(argv: list[str]) -> None:
    """A compile worker: `python -m server.engine.warmup ARGS_JSON UNIT,UNIT,...`."""
    from .factory import build_engine, check_decode  # the factory imports this module
    from .loader import load_model

    logging.basicConfig(level=logging.WARNING)
    args = EngineArgs(**json.loads(argv[0]))
    assert args.model is not None
    engine = build_engine(args, load_model(args.model, one_layer_per_kind=True))
    for unit in argv[1].split(","):
        t0 = time.perf_counter()
        if unit == CHECK:
            check_decode(engine)
        else:
            warm_up(engine, [unit])
        print(f"{unit} {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1:])
