"""The generated kernel sources compile: CUDA with nvcc (as MLX's cuda_kernel wraps them), the
Metal body as C++ against a shim of the Metal names it uses (Metal itself cannot be compiled here).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from server.kernels.dialects import CUDA, METAL
from server.kernels.mla_decode import COMBINE, DIRECT, LAUNCHES, SPLIT, Launch
from server.kernels.tiles import TileConfig

CUDA_TYPES = {"half": "__half", "bfloat": "__nv_bfloat16", "float": "float", "uint32": "uint32_t", "int32": "int32_t"}
# Mistral Small 4 (R=256, H=32) and DeepSeek-V3 (R=512, H=128) shapes.
SHAPES = [
    dict(H=32, HG=32, R=256, P=64, GS=64, BS=64, TT=64, NW=8, NSTAGE=2),
    dict(H=32, HG=32, R=256, P=64, GS=64, BS=64, TT=32, NW=16, NSTAGE=4),
    dict(H=128, HG=32, R=512, P=64, GS=64, BS=64, TT=32, NW=8, NSTAGE=3),
]


def template_ints(launch: Launch, shape: dict[str, int]) -> dict[str, int]:
    """The launch's integer template constants (all but T), in declared order, from `shape`."""
    consts = dict(shape, SMEM_BYTES=smem_for(shape))
    return {k: consts[k] for k in launch.template if k != "T"}


def kernel_signature(launch: Launch, typ: Callable[[str], str]) -> str:
    ins = [f"    const {typ(t)}* {n}" for n, t in launch.inputs]
    outs = [f"    {typ(t)}* {n}" for n, t in launch.outputs]
    return f"__global__ void {launch.kernel_name}(\n" + ",\n".join(ins + outs) + ") {\n"


def cuda_translation_unit(launch: Launch, dtype: str, consts: dict[str, int]) -> str:
    """What MLX's cuda_kernel builds from (header, source): includes, header, a kernel whose
    parameters are the inputs as const pointers then the outputs, template constants, body."""

    def typ(t: str) -> str:
        return CUDA_TYPES[dtype] if t == "T" else CUDA_TYPES[t]

    header, source = CUDA.render(launch.body, launch.defines)
    consts_src = "".join(f"  constexpr int {k} = {v};\n" for k, v in consts.items())
    return (
        "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cstdint>\n"
        "#include <cooperative_groups.h>\n"
        + header
        + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
        + kernel_signature(launch, typ)
        + f"  using T = {CUDA_TYPES[dtype]};\n"
        + consts_src
        + source
        + "\n}\n}  // namespace mlx::core::cu\n"
    )


def test_launch_declarations_are_consistent() -> None:
    """Each launch's buffers and constants are names its body uses (but `after`, which only
    orders the GPU); the partial launches differ only in outputs and MLA_DIRECT; combine reads
    what split writes."""
    assert [launch.name for launch in LAUNCHES] == ["direct", "split", "combine"]
    for launch in LAUNCHES:
        names = launch.input_names + launch.output_names + list(launch.template)
        assert len(set(names)) == len(names), launch.name
        for name in set(names) - {"after", "T"}:
            assert re.search(rf"\b{name}\b", launch.body), (launch.name, name)
    assert DIRECT.inputs == SPLIT.inputs and DIRECT.template == SPLIT.template
    assert DIRECT.outputs == COMBINE.outputs and dict(DIRECT.defines) != dict(SPLIT.defines)
    assert set(SPLIT.outputs) <= set(COMBINE.inputs)


def smem_for(c: dict[str, int]) -> int:
    return TileConfig(c["HG"], c["TT"], c["NW"], 1, c["NSTAGE"]).smem_bytes(c["R"], c["P"], c["GS"])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("shape", SHAPES, ids=["mistral4", "mistral4-tt32", "deepseek3"])
def test_cuda_source_compiles_for_sm90(tmp_path: Path, shape: dict[str, int]) -> None:
    units = [(DIRECT, "half"), (SPLIT, "bfloat"), (COMBINE, "bfloat")]
    for launch, dtype in units:
        kind = launch.name
        src = tmp_path / f"{kind}_{dtype}.cu"
        src.write_text(cuda_translation_unit(launch, dtype, template_ints(launch, shape)))
        r = subprocess.run(
            [
                "nvcc",
                "-arch=sm_90",
                "-std=c++17",
                "--cubin",
                "-Xptxas",
                "-v",
                "-o",
                str(tmp_path / f"{kind}.cubin"),
                str(src),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-4000:]
        assert "bytes stack frame" in r.stderr  # ptxas reported the kernel it built
        assert "0 bytes spill stores" in r.stderr, r.stderr
        if kind != "combine":
            ptx = tmp_path / f"{kind}.ptx"
            r = subprocess.run(
                ["nvcc", "-arch=sm_90", "-std=c++17", "--ptx", "-o", str(ptx), str(src)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert r.returncode == 0, r.stderr[-4000:]
            assert "mma.sync.aligned.m16n8k16.row.col.f32" in ptx.read_text()


# Just enough of the Metal language for g++ to type-check the generated Metal body: address
# spaces are empty macros, the types are stand-ins of the right size, builtins are no-ops.
METAL_SHIM = r"""
#include <cstdint>
#include <cstddef>
#include <cstring>
#define device
#define threadgroup
#define thread
#define constant
struct half { uint16_t bits; half() = default; half(float) : bits(0) {} operator float() const { return 0.f; } };
struct bfloat16_t { uint16_t bits; bfloat16_t() = default; bfloat16_t(float) : bits(0) {}
                    operator float() const { return 0.f; } };
typedef unsigned uint;
struct uint3 { uint x, y, z; };
struct float2 { float x, y; float2() = default; float2(float a, float b) : x(a), y(b) {} };
struct uint4 {
  uint x, y, z, w;
  uint4() = default;
  explicit uint4(uint a) : x(a), y(a), z(a), w(a) {}
  uint4(uint a, uint b, uint c, uint d) : x(a), y(b), z(c), w(d) {}
  uint operator[](int i) const { return i == 0 ? x : (i == 1 ? y : (i == 2 ? z : w)); }
};
template <typename T, int N> struct vec;
template <typename T> struct vec<T, 2> { T x, y; vec(T a, T b) : x(a), y(b) {} };
template <typename To, typename From> To as_type(From f) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To t; std::memcpy(&t, &f, sizeof t); return t;
}
struct simdgroup_float8x8 { float2 e; float2& thread_elements() { return e; } };
inline void simdgroup_multiply_accumulate(simdgroup_float8x8&, const simdgroup_float8x8&,
                                          const simdgroup_float8x8&, const simdgroup_float8x8&) {}
inline float simd_sum(float v) { return v; }
inline float simd_max(float v) { return v; }
inline float simd_min(float v) { return v; }
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
namespace metal {
inline float max(float a, float b) { return a > b ? a : b; }
inline float min(float a, float b) { return a < b ? a : b; }
inline float abs(float a) { return a < 0 ? -a : a; }
inline float round(float a) { return a; }
inline float exp2(float a) { return a; }
}
using namespace metal;
"""
METAL_TYPES = {"half": "half", "bfloat": "bfloat16_t", "float": "float", "uint32": "uint32_t", "int32": "int32_t"}
METAL_ATTRIBUTES = (
    "uint3 thread_position_in_threadgroup, uint thread_index_in_simdgroup, "
    "uint simdgroup_index_in_threadgroup, uint3 threadgroup_position_in_grid"
)


def metal_translation_unit(launch: Launch, consts: dict[str, int]) -> str:
    """The Metal source as MLX's metal_kernel lays it out (a template over T and the constants,
    inputs as const device pointers), instantiated for half and bfloat16_t."""
    header, source = METAL.render(launch.body, launch.defines)

    def typ(t: str) -> str:
        return "T" if t == "T" else METAL_TYPES[t]

    args = (
        [f"const device {typ(t)}* {n}" for n, t in launch.inputs]
        + [f"device {typ(t)}* {n}" for n, t in launch.outputs]
        + [METAL_ATTRIBUTES]
    )
    names = list(consts)
    tmpl = "template <typename T, " + ", ".join(f"int {k}" for k in names) + ">\n"
    fn = launch.kernel_name
    inst = "".join(
        f"template void {fn}<{t}, {', '.join(str(consts[k]) for k in names)}>("
        + ", ".join(a.rsplit(" ", 1)[0].replace("T*", f"{t}*") if "T*" in a else a.rsplit(" ", 1)[0] for a in args[:-1])
        + ", uint3, uint, uint, uint3);\n"
        for t in ("half", "bfloat16_t")
    )
    return METAL_SHIM + header + tmpl + f"void {fn}(" + ", ".join(args) + ") {\n" + source + "\n}\n" + inst


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: launch.name)
def test_metal_source_type_checks_as_cpp(tmp_path: Path, launch: Launch) -> None:
    for inc in ("metal_simdgroup", "metal_simdgroup_matrix"):
        (tmp_path / inc).write_text("")
    shape = dict(H=32, HG=16, R=256, P=64, GS=64, BS=64, TT=16, NW=4, NSTAGE=2)
    assert smem_for(shape) <= 32 * 1024  # Apple GPUs' threadgroup memory
    src = tmp_path / f"{launch.name}.cpp"
    src.write_text(metal_translation_unit(launch, template_ints(launch, shape)))
    r = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-Wno-unknown-pragmas", "-I", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-4000:]
