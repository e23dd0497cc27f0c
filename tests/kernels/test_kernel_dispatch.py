"""Backend choice and the shapes each fused kernel accepts (host-side logic; runs on CPU)."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import pytest

from server.bench.kernel_cases import GROUP_CASES, POISONED_CASES, SHAPE_CASES, Case, decode_inputs, filled_cache
from server.kernels import mla_decode
from server.kernels.latent_cache import LatentCache
from server.kernels.mla_decode import Launch, mla_decode_append
from server.kernels.tiles import TileConfig, choose_config, unsupported_reason
from server.platform import current_platform

on_gpu = current_platform().is_gpu


@pytest.mark.skipif(on_gpu, reason="the default device is a GPU: the fused kernel is chosen")
def test_cpu_uses_the_cpu_path() -> None:
    backend = current_platform().defaults.decode_backend
    assert backend == "cpu"
    cache, table = filled_cache([5, 70], 256, 64, mx.float16)
    args = decode_inputs(2, 4, 256, 64, mx.float16)
    ctx = mx.array([5, 70], mx.int32)
    out = mla_decode_append(*args, cache, table, ctx, 0.1, backend=backend)
    assert out.shape == (2, 4, 256) and out.dtype == mx.float16
    assert cache.last_out is None  # only the fused kernels chain through it


def test_unknown_backend_is_refused() -> None:
    cache, table = filled_cache([3], 256, 64, mx.float16)
    with pytest.raises(ValueError):
        mla_decode_append(
            *decode_inputs(1, 4, 256, 64, mx.float16), cache, table, mx.array([3], mx.int32), 0.1, backend="vulkan"
        )


@pytest.mark.parametrize("R,H", [(256, 32), (512, 128), (512, 16), (256, 1)])
def test_default_tiles_fit_each_backend(R: int, H: int) -> None:
    cache = LatentCache(4, 64, R, 64, 64, mx.bfloat16)
    for backend in ("cuda", "metal"):
        cfg = choose_config(backend, 4, H, R, 64, 100, 64)
        reason = unsupported_reason(backend, cache, cfg)
        # Metal's 32 KB of threadgroup memory holds R=512 tiles only with one stage and the
        # queries read from device memory; CUDA keeps them in shared memory.
        assert reason is None, reason
        assert cfg.q_shared == (backend == "cuda" or R == 256)


def test_cuda_tiles_follow_the_latent_width() -> None:
    """64-token tiles for R=256, 32 for R=512 (measured on the H100: docs/kernels.md)."""
    assert choose_config("cuda", 16, 32, 256, 64, 129, 64).tt == 64
    assert choose_config("cuda", 16, 128, 512, 64, 129, 64).tt == 32
    assert choose_config("cuda", 16, 32, 256, 64, 129, 32).tt == 32  # a tile lies in one block


def test_splits_follow_the_batch() -> None:
    long_single = choose_config("cuda", 1, 32, 256, 64, 513, 64)
    big_batch = choose_config("cuda", 16, 32, 256, 64, 513, 64)
    assert long_single.pps < big_batch.pps  # one long sequence is cut into more splits
    assert choose_config("cuda", 1, 32, 256, 64, 3, 64).pps == 3  # short: one split, no combine


def test_unsupported_shapes_are_named() -> None:
    def reason(cache: LatentCache, cfg: TileConfig) -> str:
        return unsupported_reason("cuda", cache, cfg) or ""

    f32 = LatentCache(2, 64, 256, 64, 64, mx.float32)
    assert "dtype" in reason(f32, TileConfig(32, 64, 8, 4))
    odd = LatentCache(2, 64, 256, 64, 64, mx.float16)
    assert "warps" in reason(odd, TileConfig(32, 64, 3, 4))
    assert "tiles" in reason(LatentCache(2, 48, 256, 64, 64, mx.float16), TileConfig(32, 64, 8, 4))
    assert "device memory" in reason(odd, TileConfig(16, 16, 4, 4, 1, q_shared=False))  # Metal's form
    assert "stage" in reason(odd, TileConfig(32, 64, 8, 4, 0))


def test_fused_launch_keeps_the_in_place_invariants(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host side of the fused path, with a stand-in kernel (no GPU needed): the cache fields
    themselves go in (no copy), each call takes the previous call's output (GPU ordering), and
    the fields come back as views that depend on the step (MLX ordering)."""
    calls: list[tuple[str, dict[str, mx.array]]] = []

    def fake_kernel(backend: str, launch: Launch, smem: int) -> Callable[..., list[mx.array]]:
        def run(
            inputs: list[mx.array],
            template: list[tuple[str, object]],
            grid: object,
            threadgroup: object,
            output_shapes: list[tuple[int, ...]],
            output_dtypes: list[mx.Dtype],
        ) -> list[mx.array]:
            assert [name for name, _ in template] == list(launch.template)
            calls.append((launch.name, dict(zip(launch.input_names, inputs, strict=True))))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]

        return run

    monkeypatch.setattr(mla_decode, "_kernel", fake_kernel)
    cache, table = filled_cache([100, 5], 256, 64, mx.bfloat16)
    before = [mx.array(a) for a in cache.arrays()]
    args = decode_inputs(2, 32, 256, 64, mx.bfloat16)
    ctx = mx.array([100, 5], mx.int32)
    cfg = TileConfig(32, 64, 8, 1)  # two splits of one block: partial + combine
    names = ("packed", "scales", "biases", "k_pe")
    fields = cache.arrays()
    out1 = mla_decode.mla_decode_append_fused("cuda", *args, cache, table, ctx, 0.1, cfg)
    (k1, in1), (k2, _) = calls
    assert (k1, k2) == ("split", "combine")
    assert all(in1[n] is f for n, f in zip(names, fields, strict=True))
    assert cache.last_out is out1
    fields = cache.arrays()
    out2 = mla_decode.mla_decode_append_fused("cuda", *args, cache, table, ctx, 0.1, cfg)
    assert calls[2][1]["after"] is out1 and cache.last_out is out2
    assert all(calls[2][1][n] is f for n, f in zip(names, fields, strict=True))
    mx.eval(out2, *cache.arrays())
    for old, new in zip(before, cache.arrays(), strict=True):
        assert mx.array_equal(old, new)  # the stand-in wrote nothing; the views show the pool


def test_one_split_launches_direct_only(monkeypatch: pytest.MonkeyPatch) -> None:
    kinds: list[str] = []

    def fake_kernel(backend: str, launch: Launch, smem: int) -> Callable[..., list[mx.array]]:
        def run(
            inputs: list[mx.array],
            template: list[tuple[str, object]],
            grid: object,
            threadgroup: object,
            output_shapes: list[tuple[int, ...]],
            output_dtypes: list[mx.Dtype],
        ) -> list[mx.array]:
            kinds.append(launch.name)
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]

        return run

    monkeypatch.setattr(mla_decode, "_kernel", fake_kernel)
    cache, table = filled_cache([3], 256, 64, mx.float16)
    out = mla_decode.mla_decode_append_fused(
        "metal", *decode_inputs(1, 4, 256, 64, mx.float16), cache, table, mx.array([3], mx.int32), 0.1
    )
    assert kinds == ["direct"] and out.shape == (1, 4, 256) and out.dtype == mx.float16


def test_a_launch_refuses_buffers_it_does_not_declare() -> None:
    dt = mx.float16
    buffers = {n: mx.zeros((1,), dt if t == "T" else mla_decode.ELEMENT_TYPES[t]) for n, t in mla_decode.COMBINE.inputs}
    assert len(mla_decode.COMBINE.bind_inputs(buffers, dt)) == len(mla_decode.COMBINE.inputs)
    with pytest.raises(ValueError, match="declared"):
        mla_decode.COMBINE.bind_inputs({**buffers, "extra": mx.zeros((1,))}, dt)
    with pytest.raises(TypeError, match="context_lens"):
        mla_decode.COMBINE.bind_inputs({**buffers, "context_lens": mx.zeros((1,), mx.int64)}, dt)
    with pytest.raises(ValueError, match="template"):
        mla_decode.COMBINE.bind_template({"T": dt, "H": 1})


@pytest.mark.skipif(not on_gpu, reason="no Metal or CUDA device: the self-test's check needs one")
@pytest.mark.parametrize(
    "case",
    [*SHAPE_CASES, *GROUP_CASES, *POISONED_CASES],
    ids=lambda c: f"B{len(c.lens)}-R{c.R}-gs{c.group_size}" + ("-bad" * c.poisoned),
)
def test_fused_kernel_matches_the_reference(case: Case) -> None:
    """On a GPU: the kernel's `out` and appended bytes against the reference (the self-test's check)."""
    from server.bench.kernel import check

    assert check(current_platform().backend, case).ok
