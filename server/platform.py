"""What this machine is and what it gets by default, answered once (after vLLM's `platforms/`).

    plat = current_platform()     # Platform(backend="cuda", device_name="NVIDIA H100 ...", memory=...)
    plat.backend                  # "metal", "cuda" or "cpu": where MLX computes by default here
    plat.defaults.max_num_seqs    # what an engine option left unset or "auto" becomes here

`DEFAULTS` states the per-backend defaults of the engine options once; `EngineArgs` writes its
help texts from them (`by_backend`, `where`), and the engine resolves the options from
`current_platform().defaults`. Kernels, engine and benchmarks all ask this module, which imports
nothing of theirs nor of HTTP, and MLX only to detect the machine: `--help` never loads MLX.

Tests pretend another machine by replacing the detected platform, `_current`
(tests/support/platforms.py), the one seam for every device-dependent choice.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

# The order help texts name the backends in.
BACKENDS = ("cuda", "metal", "cpu")
_NAMES = {"cuda": "CUDA", "metal": "Metal", "cpu": "the CPU"}


@dataclass(frozen=True)
class Defaults:
    """On one backend, what each engine option left unset or "auto" becomes (`EngineArgs`)."""

    max_num_seqs: int
    prefill_chunk_size: int
    warmup: bool  # --warmup auto warms up
    compile_workers: bool  # --warmup-workers unset starts workers, as cores and memory allow (warmup.py)
    moe_by_expert: bool  # --moe-by-expert auto runs large batches' experts one at a time (experts.py)
    prefill_buckets: bool  # --prefill-buckets auto pads prefill attention where cuDNN takes the heads
    decode_backend: str  # --decode-backend auto: a fused kernel ("metal", "cuda"; checked at load) or "cpu"


# max_num_seqs: on the CPU (2 cores, demo model) 16 sequences decode at 254 tok/s and 64 at 275,
# while each stream waits 4x as long per token. prefill_chunk_size: on CUDA a lone 8K prompt
# reached its first token 1.6x sooner with 2048 than with 512; on the CPU 2048-token steps ran 24%
# slower per token; Metal is not measured. docs/serving.md has both. The CUDA-only choices exist
# for MLX's CUDA backend: kernels compiled on first use (warmup.py), row-by-row `gather_qmm`
# (experts.py), a cuDNN graph per prefill shape (mla_attention.sdpa_bucket).
_BY_OPTION: dict[str, dict[str, Any]] = {
    "max_num_seqs": {"cuda": 64, "metal": 64, "cpu": 16},
    "prefill_chunk_size": {"cuda": 2048, "metal": 512, "cpu": 512},
    "warmup": {"cuda": True, "metal": True, "cpu": False},
    "compile_workers": {"cuda": True, "metal": False, "cpu": False},
    "moe_by_expert": {"cuda": True, "metal": False, "cpu": False},
    "prefill_buckets": {"cuda": True, "metal": False, "cpu": False},
    "decode_backend": {"cuda": "cuda", "metal": "metal", "cpu": "cpu"},
}
DEFAULTS = {backend: Defaults(**{option: by[backend] for option, by in _BY_OPTION.items()}) for backend in BACKENDS}


@dataclass(frozen=True)
class Platform:
    """The machine this process runs on, as MLX sees it."""

    backend: str  # "metal", "cuda" or "cpu": MLX's default device here; also the tag reports carry
    device_name: str  # what MLX calls the device ("" where it says nothing)
    # Bytes of device memory the process may use: Metal's recommended working set, CUDA's total
    # memory; 0 where MLX reports none (the CPU).
    memory: int

    @property
    def is_gpu(self) -> bool:
        return self.backend != "cpu"

    @property
    def defaults(self) -> Defaults:
        return DEFAULTS[self.backend]


def detect() -> Platform:
    """This process's platform, from MLX: its default device, then which GPU backend it has."""
    import mlx.core as mx

    if mx.default_device() != mx.gpu:
        backend = "cpu"
    elif mx.metal.is_available():
        backend = "metal"
    elif mx.cuda.is_available():
        backend = "cuda"
    else:
        raise RuntimeError("MLX's default device is a GPU, but MLX has neither Metal nor CUDA")
    info: dict[str, object] = {}
    with contextlib.suppress(Exception):  # device_info is not on every backend of every MLX
        info = dict(mx.device_info())
    memory = info.get("max_recommended_working_set_size") or info.get("total_memory") or info.get("memory_size")
    return Platform(backend, str(info.get("device_name") or ""), memory if isinstance(memory, int) else 0)


_current: Platform | None = None


def current_platform() -> Platform:
    """The platform this process runs on, detected at the first call."""
    global _current
    if _current is None:
        _current = detect()
    return _current


def by_backend(option: str) -> str:
    """An option's per-backend defaults in words, for its help: "64 on a GPU, 16 on the CPU"."""
    values: dict[object, list[str]] = {}
    for backend in BACKENDS:
        values.setdefault(getattr(DEFAULTS[backend], option), []).append(backend)
    return ", ".join(f"{value} on {_where(backends)}" for value, backends in values.items())


def where(option: str) -> str:
    """Where a yes-or-no default is yes, for its help: "CUDA", "a GPU"."""
    return _where([backend for backend in BACKENDS if getattr(DEFAULTS[backend], option)])


def _where(backends: list[str]) -> str:
    if set(backends) == {"cuda", "metal"}:
        return "a GPU"
    return " and ".join(_NAMES[b] for b in backends)
