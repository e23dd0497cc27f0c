"""The generated kernel sources compile: CUDA with nvcc (as MLX's cuda_kernel wraps them), the
Metal body as C++ against a shim of the Metal names it uses (Metal itself cannot be compiled here).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from server.kernels import codegen, mla_body
from server.kernels.fused import TileConfig

CUDA_TYPES = {"half": "__half", "bfloat": "__nv_bfloat16", "float": "float",
              "uint32": "uint32_t", "int32": "int32_t"}
PARTIAL_INPUTS = [("q_latent", "T"), ("q_pe", "T"), ("new_latent", "T"), ("new_kpe", "T"),
                  ("packed", "uint32"), ("scales", "T"), ("biases", "T"), ("k_pe", "T"),
                  ("block_table", "int32"), ("context_lens", "int32"), ("params", "float"),
                  ("after", "T")]
COMBINE_INPUTS = [("o_part", "float"), ("ml_part", "float"), ("context_lens", "int32")]
# Mistral Small 4 (R=256, H=32) and DeepSeek-V3 (R=512, H=128) shapes.
SHAPES = [dict(H=32, HG=32, R=256, P=64, GS=64, BS=64, TT=64, PPS=8, NW=8, MAXB=512, NSPLIT=64),
          dict(H=128, HG=32, R=512, P=64, GS=64, BS=64, TT=32, PPS=4, NW=8, MAXB=64, NSPLIT=16)]


def kernel_signature(kind: str, typ, params: list[tuple[str, str]], outputs) -> str:
    ins = [f"    const {typ(t)}* {n}" for n, t in params]
    outs = [f"    {typ(t)}* {n}" for n, t in outputs]
    return f"__global__ void mla_{kind}(\n" + ",\n".join(ins + outs) + ") {\n"


def kernel_parts(kind: str):
    """(body, inputs, outputs, defines) of one launch kind, as fused.py launches it."""
    if kind == "combine":
        return mla_body.COMBINE, COMBINE_INPUTS, [("out", "T")], {}
    direct = kind == "direct"
    outputs = [("out", "T")] if direct else [("o_part", "float"), ("ml_part", "float")]
    return mla_body.PARTIAL, PARTIAL_INPUTS, outputs, {"MLA_DIRECT": int(direct)}


def cuda_translation_unit(kind: str, dtype: str, consts: dict[str, int]) -> str:
    """What MLX's cuda_kernel builds from (header, source): includes, header, a kernel whose
    parameters are the inputs as const pointers then the outputs, template constants, body."""
    typ = lambda t: CUDA_TYPES[dtype] if t == "T" else CUDA_TYPES[t]  # noqa: E731
    body, params, outputs, defines = kernel_parts(kind)
    header, source = codegen.render("cuda", body, defines)
    consts_src = "".join(f"  constexpr int {k} = {v};\n" for k, v in consts.items())
    return ("#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cstdint>\n"
            "#include <cooperative_groups.h>\n" + header
            + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
            + kernel_signature(kind, typ, params, outputs)
            + f"  using T = {CUDA_TYPES[dtype]};\n" + consts_src + source
            + "\n}\n}  // namespace mlx::core::cu\n")


def smem_for(c: dict) -> int:
    return TileConfig(c["HG"], c["TT"], c["NW"], c["PPS"]).smem_bytes(c["R"], c["P"])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("shape", SHAPES, ids=["mistral4", "deepseek3"])
def test_cuda_source_compiles_for_sm90(tmp_path: Path, shape):
    consts = dict(shape, SMEM_BYTES=smem_for(shape))
    units = [("direct", "half"), ("split", "bfloat"), ("combine", "bfloat")]
    for kind, dtype in units:
        src = tmp_path / f"{kind}_{dtype}.cu"
        src.write_text(cuda_translation_unit(kind, dtype, consts))
        r = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "--cubin", "-Xptxas", "-v",
                            "-o", str(tmp_path / f"{kind}.cubin"), str(src)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-4000:]
        assert "bytes stack frame" in r.stderr  # ptxas reported the kernel it built
        assert "0 bytes spill stores" in r.stderr, r.stderr
        if kind != "combine":
            ptx = tmp_path / f"{kind}.ptx"
            r = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "--ptx", "-o", str(ptx),
                                str(src)], capture_output=True, text=True, timeout=300)
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
METAL_TYPES = {"half": "half", "bfloat": "bfloat16_t", "float": "float", "uint32": "uint32_t",
               "int32": "int32_t"}
METAL_ATTRIBUTES = ("uint3 thread_position_in_threadgroup, uint thread_index_in_simdgroup, "
                    "uint simdgroup_index_in_threadgroup, uint3 threadgroup_position_in_grid")


def metal_translation_unit(kind: str, consts: dict[str, int]) -> str:
    """The Metal source as MLX's metal_kernel lays it out (a template over T and the constants,
    inputs as const device pointers), instantiated for half and bfloat16_t."""
    body, params, outputs, defines = kernel_parts(kind)
    header, source = codegen.render("metal", body, defines)
    typ = lambda t: "T" if t == "T" else METAL_TYPES[t]  # noqa: E731
    args = [f"const device {typ(t)}* {n}" for n, t in params] + \
        [f"device {typ(t)}* {n}" for n, t in outputs] + [METAL_ATTRIBUTES]
    names = list(consts)
    tmpl = "template <typename T, " + ", ".join(f"int {k}" for k in names) + ">\n"
    fn = f"mla_{kind}"
    inst = "".join(
        f"template void {fn}<{t}, {', '.join(str(consts[k]) for k in names)}>("
        + ", ".join(a.rsplit(" ", 1)[0].replace("T*", f"{t}*") if "T*" in a else a.rsplit(" ", 1)[0]
                    for a in args[:-1]) + ", uint3, uint, uint, uint3);\n"
        for t in ("half", "bfloat16_t"))
    return METAL_SHIM + header + tmpl + f"void {fn}(" + ", ".join(args) + ") {\n" + source + \
        "\n}\n" + inst


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize("kind", ["direct", "split", "combine"])
def test_metal_source_type_checks_as_cpp(tmp_path: Path, kind):
    for inc in ("metal_simdgroup", "metal_simdgroup_matrix"):
        (tmp_path / inc).write_text("")
    shape = dict(H=32, HG=16, R=256, P=64, GS=64, BS=64, TT=16, PPS=8, NW=4, MAXB=512, NSPLIT=64)
    consts = dict(shape, SMEM_BYTES=smem_for(shape))
    assert consts["SMEM_BYTES"] <= 32 * 1024  # Apple GPUs' threadgroup memory
    src = tmp_path / f"{kind}.cpp"
    src.write_text(metal_translation_unit(kind, consts))
    r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-Wno-unknown-pragmas",
                        "-I", str(tmp_path), str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-4000:]
