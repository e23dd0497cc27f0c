"""The start-up self-check (server/kernels/selfcheck.py): its verdicts and the fallback it sets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import pytest

from server.kernels import mla_decode, selfcheck
from server.kernels.mla_decode import default_backend, set_default_backend
from server.kernels.reference import mla_decode_append_reference

SHAPE = (256, 64, 8, mx.bfloat16, 64, 64)  # R, P, H, dtype, group_size, block_size


@pytest.fixture(autouse=True)
def no_override(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    set_default_backend(None)
    yield
    set_default_backend(None)


def pretend_cuda(monkeypatch: pytest.MonkeyPatch, fused: Any) -> None:
    monkeypatch.setattr(mla_decode, "device_backend", lambda: "cuda")
    monkeypatch.setattr(selfcheck, "device_backend", lambda: "cuda")
    monkeypatch.setattr(mla_decode, "mla_decode_append_fused", fused)
    monkeypatch.setattr(selfcheck, "mla_decode_append_fused", fused)


def test_forced_reference_skips_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    set_default_backend("reference")
    v = selfcheck.check_fused_decode(*SHAPE)
    assert v.backend == "reference" and v.checked is None and "forced" in v.detail
    assert default_backend() == "reference"


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="vulkan"):
        set_default_backend("vulkan")


def test_a_kernel_that_fails_to_compile_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> mx.array:
        raise RuntimeError("nvrtc: error: identifier 'uint' is undefined")

    pretend_cuda(monkeypatch, broken)
    v = selfcheck.check_fused_decode(*SHAPE)
    assert (v.backend, v.checked, v.ok) == ("reference", "cuda", False)
    assert "nvrtc" in v.detail and default_backend() == "reference"
    assert [r.levelname for r in caplog.records] == ["ERROR"]


def test_a_wrong_kernel_falls_back_with_its_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(backend: str, *args: Any, **kwargs: Any) -> mx.array:
        return mla_decode_append_reference(*args[:8]) * 1.1

    pretend_cuda(monkeypatch, wrong)
    v = selfcheck.check_fused_decode(*SHAPE)
    assert v.backend == "reference" and not v.ok and v.rel is not None and v.rel > 0.05
    assert "rel=" in v.detail and default_backend() == "reference"


def test_a_forced_fused_kernel_is_kept_even_when_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(backend: str, *args: Any, **kwargs: Any) -> mx.array:
        return mla_decode_append_reference(*args[:8]) * 1.1

    pretend_cuda(monkeypatch, wrong)
    set_default_backend("cuda")
    v = selfcheck.check_fused_decode(*SHAPE)
    assert v.backend == "cuda" and not v.ok


def test_a_correct_kernel_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    def right(backend: str, *args: Any, **kwargs: Any) -> mx.array:
        return mla_decode_append_reference(*args[:8])

    pretend_cuda(monkeypatch, right)
    v = selfcheck.check_fused_decode(*SHAPE)
    assert (v.backend, v.ok) == ("cuda", True) and v.rel == 0.0
    assert default_backend() == "cuda"
    assert set(v.as_dict()) >= {"backend", "checked", "ok", "detail"}
