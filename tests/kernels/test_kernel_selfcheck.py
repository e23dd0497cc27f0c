"""The start-up self-check (server/kernels/selfcheck.py): its verdicts name the backend that decodes."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import pytest
from support.platforms import pretend

from server.kernels import selfcheck
from server.kernels.reference import mla_decode_append_reference

SHAPE = (256, 64, 8, mx.bfloat16, 64, 64)  # R, P, H, dtype, group_size, block_size


def pretend_cuda(monkeypatch: pytest.MonkeyPatch, fused: Any) -> None:
    pretend(monkeypatch, "cuda")
    monkeypatch.setattr(selfcheck, "mla_decode_append_fused", fused)


def test_forced_reference_skips_the_check() -> None:
    v = selfcheck.check_fused_decode(*SHAPE, forced="reference")
    assert v.backend == "reference" and v.checked is None and "forced" in v.detail


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="vulkan"):
        selfcheck.check_fused_decode(*SHAPE, forced="vulkan")


def test_a_kernel_that_fails_to_compile_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> mx.array:
        raise RuntimeError("nvrtc: error: identifier 'uint' is undefined")

    pretend_cuda(monkeypatch, broken)
    v = selfcheck.check_fused_decode(*SHAPE)
    assert (v.backend, v.checked, v.ok) == ("reference", "cuda", False)
    assert "nvrtc" in v.detail
    assert [r.levelname for r in caplog.records] == ["ERROR"]


def test_a_wrong_kernel_falls_back_with_its_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(backend: str, *args: Any, **kwargs: Any) -> mx.array:
        return mla_decode_append_reference(*args[:8]) * 1.1

    pretend_cuda(monkeypatch, wrong)
    v = selfcheck.check_fused_decode(*SHAPE)
    assert (v.backend, v.checked) == ("reference", "cuda") and not v.ok and v.rel is not None and v.rel > 0.05
    assert "rel=" in v.detail


def test_a_forced_fused_kernel_is_kept_even_when_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(backend: str, *args: Any, **kwargs: Any) -> mx.array:
        return mla_decode_append_reference(*args[:8]) * 1.1

    pretend_cuda(monkeypatch, wrong)
    v = selfcheck.check_fused_decode(*SHAPE, forced="cuda")
    assert v.backend == "cuda" and not v.ok


def test_a_correct_kernel_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    def right(backend: str, *args: Any, **kwargs: Any) -> mx.array:
        return mla_decode_append_reference(*args[:8])

    pretend_cuda(monkeypatch, right)
    v = selfcheck.check_fused_decode(*SHAPE)
    assert (v.backend, v.checked, v.ok) == ("cuda", "cuda", True) and v.rel == 0.0
    assert set(v.as_dict()) >= {"backend", "checked", "ok", "detail"}


def test_the_cpu_checks_nothing_and_decodes_through_its_plain_mlx_path(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend(monkeypatch, "cpu")
    v = selfcheck.check_fused_decode(*SHAPE)
    assert (v.backend, v.checked, v.ok) == ("cpu", None, True) and "no fused kernel" in v.detail
