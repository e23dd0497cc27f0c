"""server/platform.py: which backend this machine runs, and the per-device defaults it states once
(what an unset option resolves to, and what `--help` says it resolves to)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from server.config import build_parser
from server.platform import detect


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """`machine(device, metal, cuda, info)`: what MLX reports, for `detect` to read."""

    def set_machine(device: mx.DeviceType, metal: bool, cuda: bool, info: dict[str, object] | None = None) -> None:
        monkeypatch.setattr(mx, "default_device", lambda: mx.Device(device))
        monkeypatch.setattr(mx.metal, "is_available", lambda: metal)
        monkeypatch.setattr(mx.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(mx, "device_info", lambda: info or {})

    return set_machine


@pytest.mark.parametrize(
    "device, metal, cuda, backend",
    [
        (mx.cpu, True, True, "cpu"),  # MLX computes on the CPU even where it has a GPU backend
        (mx.gpu, True, False, "metal"),
        (mx.gpu, False, True, "cuda"),
        (mx.gpu, True, True, "metal"),
    ],
)
def test_the_backend_is_the_default_device_then_its_gpu_backend(machine, device, metal, cuda, backend):
    machine(device, metal, cuda)
    assert detect().backend == backend


def test_a_gpu_without_metal_or_cuda_is_refused(machine):
    machine(mx.gpu, False, False)
    with pytest.raises(RuntimeError, match="neither Metal nor CUDA"):
        detect()


def test_the_device_name_and_memory_come_from_mlx(machine):
    machine(mx.gpu, True, False, {"device_name": "Apple M2 Max", "max_recommended_working_set_size": 22 << 30})
    assert (detect().device_name, detect().memory) == ("Apple M2 Max", 22 << 30)
    machine(mx.gpu, False, True, {"device_name": "NVIDIA H100 80GB HBM3", "total_memory": 80 << 30})
    assert (detect().device_name, detect().memory) == ("NVIDIA H100 80GB HBM3", 80 << 30)
    machine(mx.cpu, False, False, {"architecture": "x86_64"})
    assert (detect().device_name, detect().memory, detect().is_gpu) == ("", 0, False)


def test_help_states_the_device_defaults():
    text = " ".join(build_parser().format_help().split())
    for said in (
        "(unset: 64 on a GPU, 16 on the CPU)",
        "(unset: 2048 on CUDA, 512 on Metal and the CPU)",
        "on, off, or auto (on a GPU only)",
        "(unset: on CUDA as many as cores and memory allow, else 0)",
        "auto (cuda on CUDA, metal on Metal, cpu on the CPU; a fused kernel is checked at load)",
        "auto (CUDA, batches giving each expert 3+ rows on average)",
        "auto (CUDA, heads cuDNN takes)",
    ):
        assert said in text
