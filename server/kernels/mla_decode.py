"""`mla_decode_append`: one decode step of MLA attention over the paged INT4 latent cache.

Shapes (B sequences, H heads, R latent width, P rope width, GS quant group, BS block size):

    q_latent      [B, H, R]   the nope query times W_UK
    q_pe          [B, H, P]   rotated
    new_latent    [B, R]      the new token's latent, normed, not quantized
    new_kpe       [B, P]      its rotated rope key
    cache         LatentCache: packed uint32 [NB, BS, R/8], scales and biases [NB, BS, R/GS],
                  k_pe [NB, BS, P] (see latent_cache.py)
    block_table   int32 [B, max_blocks]; padding entries are never read; an entry outside
                  [0, NB) is never read or written through: its tokens weigh nothing, and an
                  append into it is dropped (a row with no token left is zeros)
    context_lens  int32 [B]   tokens already cached (tokens past the table's width are not read)
    -> out        [B, H, R]   in cache.dtype

Where it lives, all one step from here:

- `mla_decode_append` (bottom of this file): runs the backend its caller names: a fused kernel
  ("metal", "cuda"), the plain-MLX CPU path ("cpu", `cpu_decode.py`: the reference's semantics
  over the packed INT4 codes, several times faster on MLX's CPU backend) or the plain-MLX
  reference ("reference", `reference.py`, the semantics). The engine's model runner names the
  backend its factory chose (`--decode-backend` and the start-up check of `selfcheck.py`). A
  shape a fused kernel does not cover (float32 caches; Metal shapes beyond its 32 KB of
  threadgroup memory) goes through the reference, with one warning per reason;
  `mla_decode_append_fused` raises for it instead.
- The fused kernel's three launches, `DIRECT`, `SPLIT` and `COMBINE`, are declared once below:
  buffers, template constants and the body text, which is in `mla_body.py`. Each `Dialect` of
  `dialects.py` (Metal, CUDA) supplies the primitives that body is written over.
- Tile sizes, split-K and the shapes the kernel covers: `tiles.py`.

In-place append: the kernel writes the new token's bytes straight into the cache's `packed`,
`scales`, `biases` and `k_pe` buffers, which it receives as *inputs* (MLX does not know about
that write). It is correct because of these invariants, kept here and by the engine:

1. No copy reaches the kernel: each field must be row-contiguous, since MLX hands a custom
   kernel a row-contiguous input as is and copies any other (`ensure_row_contiguous=True`,
   which also makes the query inputs contiguous for free); a write into such a temporary copy
   would be lost. LatentCache only ever holds row-contiguous fields (zeros, scatter results,
   `mx.depends` views of those); never set a field to a slice, transpose or broadcast. The
   self-test checks on the GPU that the appended bytes land in the cache and that a step's
   peak memory does not grow with the pool.
2. Ordering, at two levels. MLX's graph: after the launch each field is replaced by
   `mx.depends(field, out)`, the same buffer with a dependency on the kernel, so anything
   built later from `cache.packed` (etc.) is scheduled after the write, and evaluating the
   fields (the engine calls `mx.eval(*cache.arrays())` after each step) runs the step. The
   GPU: within one evaluation MLX's CUDA graph (and Metal's barriers) order a kernel only
   after the kernels that *output* the buffers it touches, and the append is not an output.
   So each call also takes the previous call's `out` (`cache.last_out`) as an input, which
   chains successive decode steps on one cache. In the same `mx.eval` as the step, a write the
   kernel must see has to produce the field it takes (prefill's `write` scatters before the
   decode, and the kernel takes the scatter's result), and a reader built after it (prefill's
   `read`) may run beside it on the GPU, so it must read only bytes the kernel does not write
   (its own sequence's blocks: invariant 3); any other writer must be evaluated in a later
   `mx.eval`. docs/kernels.md lists every op on the cache between two steps, and
   tests/kernels/test_kernel_ordering.py checks each ordering the engine uses.
   Read the fields from the cache at the time of use; never keep an old field array.
3. Ownership: the block that holds position context_lens[b] belongs to sequence b alone (a
   shared prefix block is always full), so no other threadgroup reads the bytes being written.
4. Memory: a step allocates `out` and, with split-K, partials of B * NSPLIT * H * (R + 2)
   floats: nothing proportional to the pool.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from typing import Any, Protocol, cast

import mlx.core as mx

from . import mla_body
from .cpu_decode import mla_decode_append_cpu
from .dialects import DIALECTS
from .latent_cache import LatentCache
from .reference import mla_decode_append_reference
from .tiles import COMBINE_WARPS, TileConfig, choose_config, combine_smem_bytes, unsupported_reason

BACKENDS = ("reference", "cpu", "metal", "cuda")
FUSED = ("metal", "cuda")  # the fused kernels; "reference" and "cpu" are plain MLX

# Element types a launch declares for its buffers; "T" is the cache dtype (float16 or bfloat16).
ELEMENT_TYPES: dict[str, mx.Dtype] = {"float": mx.float32, "int32": mx.int32, "uint32": mx.uint32}

TemplateValue = int | mx.Dtype


@dataclass(frozen=True)
class Launch:
    """One launch kind of the fused kernel, as MLX's kernel factory and each call take it."""

    name: str  # "direct", "split" or "combine"; the MLX kernel is `kernel_name`
    inputs: tuple[tuple[str, str], ...]  # (buffer, element type), in parameter order
    outputs: tuple[tuple[str, str], ...]
    template: tuple[str, ...]  # template constants, in order; "T" is the cache dtype
    body: str  # the kernel text, from mla_body.py
    defines: tuple[tuple[str, int], ...] = ()  # #defines put before the dialect's prelude

    def specialized(self, defines: tuple[tuple[str, int], ...]) -> Launch:
        """This launch with more #defines (a tile configuration's); itself when there are none."""
        return replace(self, defines=self.defines + defines) if defines else self

    @property
    def kernel_name(self) -> str:
        return f"mla_decode_{self.name}"

    @property
    def input_names(self) -> list[str]:
        return [n for n, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _ in self.outputs]

    def bind_inputs(self, arrays: Mapping[str, mx.array], dtype: mx.Dtype) -> list[mx.array]:
        """`arrays` in declared order; refuses a missing or extra buffer or a wrong element type."""
        self.check_names("inputs", self.input_names, arrays)
        for n, t in self.inputs:
            want = dtype if t == "T" else ELEMENT_TYPES[t]
            if arrays[n].dtype != want:
                raise TypeError(f"{self.kernel_name}: input {n} is {arrays[n].dtype}, declared {want}")
        return [arrays[n] for n in self.input_names]

    def bind_template(self, values: Mapping[str, TemplateValue]) -> list[tuple[str, TemplateValue]]:
        """The template constants in declared order; refuses a missing or extra name."""
        self.check_names("template constants", list(self.template), values)
        return [(n, values[n]) for n in self.template]

    def output_dtypes(self, dtype: mx.Dtype) -> list[mx.Dtype]:
        return [dtype if t == "T" else ELEMENT_TYPES[t] for _, t in self.outputs]

    def check_names(self, what: str, declared: Sequence[str], given: Mapping[str, object]) -> None:
        """Refuses `given` unless its keys are exactly the `declared` names."""
        if set(given) != set(declared):
            raise ValueError(f"{self.kernel_name}: {what} {sorted(given)} != declared {sorted(declared)}")


# The partial pass, with one split (DIRECT: writes `out`) or several (SPLIT: writes partials).
PARTIAL_INPUTS = (
    ("q_latent", "T"),
    ("q_pe", "T"),
    ("new_latent", "T"),
    ("new_kpe", "T"),
    ("packed", "uint32"),
    ("scales", "T"),
    ("biases", "T"),
    ("k_pe", "T"),
    ("block_table", "int32"),
    ("context_lens", "int32"),
    ("params", "float"),  # [scale]
    ("dims", "int32"),  # [max_blocks, nsplit, pps, num_blocks]: runtime, so they compile nothing
    ("after", "T"),  # the previous step's out on this cache: GPU ordering (invariant 2)
)
PARTIAL_TEMPLATE = ("T", "H", "HG", "R", "P", "GS", "BS", "TT", "NW", "NSTAGE", "SMEM_BYTES")
DIRECT = Launch("direct", PARTIAL_INPUTS, (("out", "T"),), PARTIAL_TEMPLATE, mla_body.PARTIAL, (("MLA_DIRECT", 1),))
SPLIT = Launch(
    "split",
    PARTIAL_INPUTS,
    (("o_part", "float"), ("ml_part", "float")),
    PARTIAL_TEMPLATE,
    mla_body.PARTIAL,
    (("MLA_DIRECT", 0),),
)
COMBINE = Launch(
    "combine",
    (("o_part", "float"), ("ml_part", "float"), ("context_lens", "int32"), ("dims", "int32")),
    (("out", "T"),),
    ("T", "H", "R", "BS", "NW"),
    mla_body.COMBINE,
)
LAUNCHES = (DIRECT, SPLIT, COMBINE)


class _KernelFn(Protocol):
    def __call__(
        self,
        *,
        inputs: list[mx.array],
        template: list[tuple[str, TemplateValue]],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        output_shapes: list[tuple[int, ...]],
        output_dtypes: list[mx.Dtype],
    ) -> list[mx.array]: ...


@cache
def _kernel(backend: str, launch: Launch, smem: int) -> _KernelFn:
    header, source = DIALECTS[backend].render(launch.body, launch.defines)
    name, inputs, outputs = launch.kernel_name, launch.input_names, launch.output_names
    # The same declaration for both; only CUDA takes its shared memory size here (Metal sizes
    # threadgroup memory from the source).
    extra: dict[str, Any] = {"shared_memory": smem} if backend == "cuda" else {}
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    kernel = make(
        name=name,
        input_names=inputs,
        output_names=outputs,
        source=source,
        header=header,
        ensure_row_contiguous=True,
        **extra,
    )
    return cast(_KernelFn, kernel)


@lru_cache(maxsize=64)
def _scalar(value: float, dtype: mx.Dtype = mx.float32) -> mx.array:
    """[1], cached: a decode loop passes the same scale at every step."""
    return mx.array([value], dtype)


@lru_cache(maxsize=256)
def _dims(*values: int) -> mx.array:
    """int32 [4], cached: consecutive decode steps mostly share their sizes."""
    return mx.array(values, mx.int32)


def _run(
    backend: str,
    launch: Launch,
    smem: int,
    buffers: Mapping[str, mx.array],
    consts: Mapping[str, TemplateValue],
    grid: tuple[int, int, int],
    threads: int,
    output_shapes: Mapping[str, tuple[int, ...]],
    dtype: mx.Dtype,
) -> dict[str, mx.array]:
    """One launch, its inputs, constants and output shapes given by name: {output name: array}."""
    launch.check_names("outputs", launch.output_names, output_shapes)
    results = _kernel(backend, launch, smem)(
        inputs=launch.bind_inputs(buffers, dtype),
        template=launch.bind_template(consts),
        grid=grid,
        threadgroup=(threads, 1, 1),
        output_shapes=[output_shapes[n] for n in launch.output_names],
        output_dtypes=launch.output_dtypes(dtype),
    )
    return dict(zip(launch.output_names, results, strict=True))


def mla_decode_append_fused(
    backend: str,
    q_latent: mx.array,
    q_pe: mx.array,
    new_latent: mx.array,
    new_kpe: mx.array,
    cache: LatentCache,
    block_table: mx.array,
    context_lens: mx.array,
    scale: float,
    cfg: TileConfig | None = None,
) -> mx.array:
    """The fused kernel on `backend` ("metal" or "cuda"); shapes as in the module docstring.
    `cfg` overrides the tiles (benchmarks). Raises NotImplementedError for a shape it does not
    cover."""
    B, H, R = q_latent.shape
    P = cache.P
    max_blocks = block_table.shape[1]
    cfg = cfg or choose_config(backend, B, H, R, P, max_blocks, cache.block_size, group_size=cache.group_size)
    reason = unsupported_reason(backend, cache, cfg)
    if reason:
        raise NotImplementedError(f"{backend} MLA decode kernel: {reason}")
    pps = max(1, min(cfg.pps, max_blocks))
    nsplit = math.ceil(max_blocks / pps)
    smem = cfg.smem_bytes(R, P, cache.group_size)
    dt = cache.dtype
    fields = cache.arrays()
    buffers = {
        "q_latent": q_latent.astype(dt),
        "q_pe": q_pe.astype(dt),
        "new_latent": new_latent.astype(dt),
        "new_kpe": new_kpe.astype(dt),
        **dict(zip(("packed", "scales", "biases", "k_pe"), fields, strict=True)),
        "block_table": block_table.astype(mx.int32),
        "context_lens": context_lens.astype(mx.int32),
        "params": _scalar(scale),
        "dims": _dims(max_blocks, nsplit, pps, cache.num_blocks),
        "after": cache.last_out if cache.last_out is not None else _scalar(0.0, dt),
    }
    consts: dict[str, TemplateValue] = {
        "T": dt,
        "H": H,
        "HG": cfg.hg,
        "R": R,
        "P": P,
        "GS": cache.group_size,
        "BS": cache.block_size,
        "TT": cfg.tt,
        "NW": cfg.nw,
        "NSTAGE": cfg.nstage,
        "SMEM_BYTES": smem,
    }
    nt = 32 * cfg.nw
    grid = (nsplit * nt, B * math.ceil(H / cfg.hg), 1)
    if nsplit == 1:
        direct = DIRECT.specialized(cfg.defines())
        out = _run(backend, direct, smem, buffers, consts, grid, nt, {"out": (B, H, R)}, dt)["out"]
    else:
        parts = _run(
            backend,
            SPLIT.specialized(cfg.defines()),
            smem,
            buffers,
            consts,
            grid,
            nt,
            {"o_part": (B, nsplit, H, R), "ml_part": (B, nsplit, H, 2)},
            dt,
        )
        nt_c = 32 * COMBINE_WARPS
        combine_buffers = {**parts, "context_lens": buffers["context_lens"], "dims": buffers["dims"]}
        combine_consts: dict[str, TemplateValue] = {
            "T": dt,
            "H": H,
            "R": R,
            "BS": cache.block_size,
            "NW": COMBINE_WARPS,
        }
        out = _run(
            backend,
            COMBINE,
            combine_smem_bytes(R),
            combine_buffers,
            combine_consts,
            (nt_c, B * H, 1),
            nt_c,
            {"out": (B, H, R)},
            dt,
        )["out"]
    cache.packed, cache.scales, cache.biases, cache.k_pe = mx.depends(fields, [out])
    cache.last_out = out
    return out


log = logging.getLogger(__name__)


@cache
def _warn_once(reason: str) -> None:
    log.warning("%s; decoding with the plain-MLX reference instead", reason)


def mla_decode_append(
    q_latent: mx.array,
    q_pe: mx.array,
    new_latent: mx.array,
    new_kpe: mx.array,
    cache: LatentCache,
    block_table: mx.array,
    context_lens: mx.array,
    scale: float,
    *,
    backend: str,
) -> mx.array:
    """Attend one new token per sequence over its cached tokens plus itself, and append it,
    through `backend` (one of `BACKENDS`).

    Shapes as in the module docstring. scores = scale * (q_latent . latent + q_pe . k_pe) over
    the context_lens[b] cached tokens and the new token (its quantized-then-dequantized latent);
    out = softmax(scores) @ latent, [B, H, R] in cache.dtype. Afterwards the cache holds the new
    token of sequence b at position context_lens[b].
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "cpu":
        return mla_decode_append_cpu(q_latent, q_pe, new_latent, new_kpe, cache, block_table, context_lens, scale)
    if backend in FUSED:
        try:
            return mla_decode_append_fused(
                backend, q_latent, q_pe, new_latent, new_kpe, cache, block_table, context_lens, scale
            )
        except NotImplementedError as exc:
            # A shape the kernel does not cover (e.g. float32, or too big for Metal's 32 KB
            # of threadgroup memory): the reference computes the same thing, only slower.
            _warn_once(str(exc))
    return mla_decode_append_reference(q_latent, q_pe, new_latent, new_kpe, cache, block_table, context_lens, scale)
