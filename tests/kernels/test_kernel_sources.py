"""The generated kernel sources compile: CUDA with nvcc (as MLX's cuda_kernel wraps them), the
Metal body as C++ against a shim of the Metal names it uses and, stricter, as C++ for OpenCL with
Metal's address spaces mapped to OpenCL's (libclang; Metal itself cannot be compiled here); and
block ids outside the pool are guarded in the text of both dialects.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from server.kernels.dialects import CUDA, METAL, Dialect
from server.kernels.mla_decode import COMBINE, DIRECT, LAUNCHES, SPLIT, Launch
from server.kernels.tiles import TileConfig

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

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


def metal_translation_unit(launch: Launch, consts: dict[str, int], rendered: tuple[str, str] | None = None) -> str:
    """The Metal source as MLX's metal_kernel lays it out (a template over T and the constants,
    inputs as const device pointers), instantiated for half and bfloat16_t. `rendered`: (header,
    source) to use instead of the launch's own."""
    header, source = rendered or METAL.render(launch.body, launch.defines)

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


def shim_check(
    tmp_path: Path, launch: Launch, shape: dict[str, int], rendered: tuple[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """g++ over the Metal source against the C++ shim."""
    for inc in ("metal_simdgroup", "metal_simdgroup_matrix"):
        (tmp_path / inc).write_text("")
    src = tmp_path / f"{launch.name}.cpp"
    src.write_text(metal_translation_unit(launch, template_ints(launch, shape), rendered))
    return subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-Wno-unknown-pragmas", "-I", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: launch.name)
def test_metal_source_type_checks_as_cpp(tmp_path: Path, launch: Launch) -> None:
    shape = dict(H=32, HG=16, R=256, P=64, GS=64, BS=64, TT=16, NW=4, NSTAGE=2)
    assert smem_for(shape) <= 32 * 1024  # Apple GPUs' threadgroup memory
    r = shim_check(tmp_path, launch, shape)
    assert r.returncode == 0, r.stderr[-4000:]


# --- The Metal source in OpenCL C++ mode: address spaces checked -------------------------------
#
# The C++ shim above makes Metal's address spaces empty, so it accepts a threadgroup pointer
# where a device pointer belongs. Here they become OpenCL's (device -> __global, threadgroup ->
# __local, constant -> __constant, thread -> __private) and clang parses the kernel as C++ for
# OpenCL 2021, which rejects a pointer or reference converted between two named address spaces
# (a `const_cast` or C-style cast across them, a `threadgroup T*` argument for a `device T*`
# parameter and the reverse), as the Metal compiler does. OpenCL kernels cannot be templates,
# so each (launch, dtype) becomes one kernel with T and the template constants declared inside.
METAL_CL_SHIM = r"""
#define device __global
#define threadgroup __local
#define constant __constant
#define thread __private
#define half metal_half
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef __SIZE_TYPE__ size_t;
typedef unsigned int uint;
struct metal_half { uint16_t bits; metal_half() = default; metal_half(float) : bits(0) {}
                    operator float() const { return 0.f; } };
struct bfloat16_t { uint16_t bits; bfloat16_t() = default; bfloat16_t(float) : bits(0) {}
                    operator float() const { return 0.f; } };
struct uint3 { uint x, y, z; };
// As in Metal, the vectors are clang ext_vector types; Metal's constructor syntax becomes
// OpenCL's vector literal (a function-like macro leaves the bare type name alone).
typedef uint uint4 __attribute__((ext_vector_type(4)));
typedef float float2 __attribute__((ext_vector_type(2)));
#define uint4(...) ((uint4)(__VA_ARGS__))
#define float2(...) ((float2)(__VA_ARGS__))
template <typename T, int N> struct vec;
template <typename T> struct vec<T, 2> { T x, y; vec(T a, T b) : x(a), y(b) {} };
template <typename To, typename From> To as_type(From f) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  return __builtin_bit_cast(To, f);
}
// Metal's simdgroup matrices live in the thread address space, and so do their elements.
struct simdgroup_float8x8 { float2 e; thread float2& thread_elements() thread { return e; } };
inline void simdgroup_multiply_accumulate(thread simdgroup_float8x8&, thread const simdgroup_float8x8&,
                                          thread const simdgroup_float8x8&, thread const simdgroup_float8x8&) {}
inline float simd_sum(float v) { return v; }
inline float simd_max(float v) { return v; }
inline float simd_min(float v) { return v; }
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
namespace metal {
inline float max(float a, float b) { return a > b ? a : b; }
inline float min(float a, float b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline float abs(float a) { return a < 0 ? -a : a; }
inline float round(float a) { return a; }
inline float exp2(float a) { return a; }
}
using namespace metal;
"""
CLANG_OPENCL_ARGS = ["-x", "cl", "-cl-std=clc++2021", "-cl-no-stdinc", "-Wno-unknown-pragmas"]
METAL_TYPE_NAMES = {"half": "half", "bfloat": "bfloat16_t"}


def metal_opencl_unit(launch: Launch, dtype: str, consts: dict[str, int], header: str, source: str) -> str:
    """One kernel of `header` + `source` (a launch as `METAL.render` gives it) for `dtype`, its
    parameters as MLX's metal_kernel declares them (inputs `const device`, outputs `device`)."""

    def typ(t: str) -> str:
        return METAL_TYPE_NAMES[dtype] if t == "T" else METAL_TYPES[t]

    args = (
        [f"const device {typ(t)}* {n}" for n, t in launch.inputs]
        + [f"device {typ(t)}* {n}" for n, t in launch.outputs]
        + [METAL_ATTRIBUTES]
    )
    decls = f"  typedef {METAL_TYPE_NAMES[dtype]} T;\n" + "".join(
        f"  constexpr int {k} = {v};\n" for k, v in consts.items()
    )
    return (
        METAL_CL_SHIM
        + header
        + f"\n__kernel void {launch.kernel_name}_{dtype}(\n    "
        + ",\n    ".join(args)
        + ") {\n"
        + decls
        + source
        + "\n}\n"
    )


def _libclang_errors(path: Path, args: list[str]) -> list[str] | None:
    """Errors from PyPI's libclang (the `test` extra), or None where it cannot be loaded."""
    try:
        import clang.cindex as ci

        index = ci.Index.create()
    except Exception:
        return None
    tu = index.parse(str(path), args=args)
    return [
        f"{d.location.line}:{d.location.column}: {d.spelling}" + "".join(f"; note: {n.spelling}" for n in d.children)
        for d in tu.diagnostics
        if d.severity >= ci.Diagnostic.Error
    ]


def _clang_binary() -> str | None:
    names = ["clang", *(f"clang-{v}" for v in range(22, 13, -1))]
    return next((p for p in map(shutil.which, names) if p), None)


def opencl_cpp_errors(path: Path, include_dir: Path) -> list[str] | None:
    """clang's errors for `path` as C++ for OpenCL 2021 (libclang, else a clang binary);
    None where neither is available."""
    args = [*CLANG_OPENCL_ARGS, "-I", str(include_dir)]
    errors = _libclang_errors(path, args)
    if errors is not None:
        return errors
    clang = _clang_binary()
    if clang is None:
        return None
    r = subprocess.run([clang, *args, "-fsyntax-only", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in r.stderr.splitlines() if "error:" in line or "note:" in line] or (
        [] if r.returncode == 0 else [r.stderr]
    )


def clang_available() -> bool:
    try:
        import clang.cindex as ci

        ci.Index.create()
        return True
    except Exception:
        return _clang_binary() is not None


needs_clang = pytest.mark.skipif(
    not clang_available(), reason="no clang: install PyPI's libclang (the `test` extra) or a clang binary"
)
METAL_SHAPE = dict(H=32, HG=16, R=256, P=64, GS=64, BS=64, TT=16, NW=4, NSTAGE=2)


def metal_errors(
    tmp_path: Path, launch: Launch, dtype: str, shape: dict[str, int], header: str, source: str
) -> list[str]:
    for inc in ("metal_simdgroup", "metal_simdgroup_matrix"):
        (tmp_path / inc).write_text("")
    src = tmp_path / f"{launch.name}_{dtype}.clcpp"
    src.write_text(metal_opencl_unit(launch, dtype, template_ints(launch, shape), header, source))
    errors = opencl_cpp_errors(src, tmp_path)
    assert errors is not None  # the caller is marked needs_clang
    return errors


@needs_clang
@pytest.mark.parametrize("dtype", ["half", "bfloat"])
@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: launch.name)
def test_metal_source_passes_opencl_address_space_checks(tmp_path: Path, launch: Launch, dtype: str) -> None:
    header, source = METAL.render(launch.body, launch.defines)
    assert metal_errors(tmp_path, launch, dtype, METAL_SHAPE, header, source) == []


# Address-space bugs planted into the real Metal text: (what, where, original, planted, clang's
# complaint). Each is an error for the Metal compiler; the C++ shim, whose address spaces are
# empty macros, accepts every one (checked below where g++ exists). Seen with libclang 18.1.1:
# "const_cast from '__local T *' to '__global T *' is not allowed"; "C-style cast from '__local T *'
# to 'const __global uint4 *' converts between mismatching address spaces"; "no matching function
# for call to 'load_b_nmajor'" (note: "cannot pass pointer to address space '__global' as a
# pointer to address space '__local' in 2nd argument");
# "const_cast from 'const __global metal_half *' to '__generic T *' is not allowed".
PLANTED = [
    (
        "threadgroup pointer written through as a device pointer (the append's k_pe store)",
        "source",
        "MUT(T, k_pe)[slot * P + i] = v;",
        "MUT(T, sNew)[slot * P + i] = v;",
        "'__local T *' (aka '__local metal_half *') to '__global T *'",
    ),
    (
        "threadgroup pointer read as the device source of a tile copy",
        "source",
        "k_pe + (slot0 + tok) * P + ch * 8,",
        "sNew + (slot0 + tok) * P + ch * 8,",
        "converts between mismatching address spaces",
    ),
    (
        "device pointer passed where a threadgroup fragment source is expected",
        "source",
        "load_b_nmajor(bf, sK + nt * 8 * LDK + kk, LDK, LANE);",
        "load_b_nmajor(bf, q_latent + nt * 8 * LDK + kk, LDK, LANE);",
        "no matching function for call to 'load_b_nmajor'",
    ),
    (
        "the in-place write's cast drops the device address space (CUDA's spelling)",
        "header",
        "#define MUT(type, ptr) const_cast<device type*>(ptr)",
        "#define MUT(type, ptr) const_cast<type*>(ptr)",
        "const __global metal_half *' to '__generic T *'",
    ),
]


@needs_clang
@pytest.mark.parametrize("bug", PLANTED, ids=[p[0].split(" (")[0] for p in PLANTED])
def test_opencl_check_rejects_planted_address_space_bugs(tmp_path: Path, bug: tuple[str, str, str, str, str]) -> None:
    """The check has teeth: each planted bug is an error here, while the C++ shim accepts it."""
    _, where, original, planted, complaint = bug
    header, source = METAL.render(DIRECT.body, DIRECT.defines)
    if where == "header":
        assert original in header
        header = header.replace(original, planted)
    else:
        assert original in source
        source = source.replace(original, planted)
    errors = metal_errors(tmp_path, DIRECT, "half", METAL_SHAPE, header, source)
    assert errors, "clang accepted a planted address-space bug"
    assert any(complaint in e for e in errors), errors
    if shutil.which("g++"):
        r = shim_check(tmp_path, DIRECT, METAL_SHAPE, (header, source))
        assert r.returncode == 0, "the C++ shim now rejects this too: " + r.stderr[-2000:]


# --- Block ids outside [0, num_blocks): the guards, in the text each dialect compiles ------------
#
# Behaviour is tested on the reference (tests/kernels/test_kernel_reference.py, CPU) and on the fused CUDA
# kernel (POISONED_CASES in `python -m server.bench kernel`, run on an H100); Metal cannot run
# here, so this checks the rendered sources of both dialects: every in-place write sits inside the
# append's bounds check, every read of a cache field is a predicated copy from a slot that is 0
# when the block is bad, and scores of a bad tile are masked.
CACHE_FIELDS = ("packed", "scales", "biases", "k_pe")
APPEND_GUARD = "if (owns_new && new_page >= 0 && new_page < nblocks) {"


def _block_span(text: str, opening: str) -> tuple[int, int]:
    """(start, end) of the brace block that `opening` (ending in "{") opens in `text`."""
    start = text.index(opening)
    depth, i = 0, start + len(opening) - 1
    while True:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return start, i
        i += 1


def _call_span(text: str, at: int) -> tuple[int, int] | None:
    """(start, end) of the ASYNC_COPY16( ... ) call that contains position `at`, if any."""
    start = text.rfind("ASYNC_COPY16(", 0, at)
    if start < 0:
        return None
    depth, i = 0, start + len("ASYNC_COPY16")
    while True:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return (start, i) if at < i else None
        i += 1


def bounds_guard_violations(header: str, source: str) -> list[str]:
    """What in a rendered partial kernel could touch memory through a block id outside the pool."""
    bad: list[str] = []
    if APPEND_GUARD not in source:
        return [f"no append guard {APPEND_GUARD!r}"]
    g0, g1 = _block_span(source, APPEND_GUARD)
    for m in re.finditer(r"MUT\(", source):
        if not g0 < m.start() < g1:
            bad.append(f"in-place write outside the append guard at {m.start()}")
    for line in (
        "const bool ok = page >= 0 && page < nblocks;",
        "const size_t slot0 = ok ? size_t(page) * BS + tn % BS : 0;",
        "const bool tile_ok = tile_page >= 0 && tile_page < nblocks;",
    ):
        if line not in source:
            bad.append(f"missing {line!r}")
    if not re.search(r"sS\[[^\]]*\] = tile_ok && ", source):
        bad.append("scores of a bad tile are not masked")
    for name in CACHE_FIELDS:
        for m in re.finditer(rf"\b{name}\s*(\+|\[)", source):
            if g0 < m.start() < g1:
                continue  # the guarded append
            span = _call_span(source, m.start())
            call = source[span[0] : span[1]] if span else ""
            if not call or "slot0" not in call or not re.search(r",\s*ok\b[^,]*$", call):
                bad.append(
                    f"read of {name} not as a copy predicated on ok from slot0: {call or source[m.start() : m.start() + 60]!r}"
                )
    # The copy primitive must not touch its source when the predicate is false.
    copy = re.search(r"#define ASYNC_COPY16\(dst, src, pred\)(.*)", header.replace("\\\n", ""))
    if not copy:
        bad.append("no ASYNC_COPY16 in the prelude")
    elif "? *((const device uint4*)(src))" not in copy.group(
        1
    ) and "async_copy16((dst), (src), (pred))" not in copy.group(1):
        bad.append(f"ASYNC_COPY16 may read src when pred is false: {copy.group(1)!r}")
    return bad


@pytest.mark.parametrize("dialect", [CUDA, METAL], ids=lambda d: d.name)
@pytest.mark.parametrize("launch", [DIRECT, SPLIT], ids=lambda launch: launch.name)
def test_bad_block_ids_are_guarded_in_each_dialects_source(dialect: Dialect, launch: Launch) -> None:
    header, source = dialect.render(launch.body, launch.defines)
    assert bounds_guard_violations(header, source) == []
    if dialect is CUDA:  # cp.async copies 0 source bytes when the predicate is false
        assert '"r"(pred ? 16 : 0)' in header


def test_the_bounds_check_catches_planted_bugs() -> None:
    """Each of these is caught by `bounds_guard_violations` (in the Metal text; CUDA's is the same body)."""
    header, source = METAL.render(DIRECT.body, DIRECT.defines)
    planted = [
        (header, source.replace("new_page >= 0 && ", "")),  # a negative block id appended into
        (
            header,
            source.replace(
                "const size_t slot0 = ok ? size_t(page) * BS + tn % BS : 0;",
                "const size_t slot0 = size_t(page) * BS + tn % BS;",
            ),
        ),
        (
            header,
            source.replace("ok && t < t_end && t != ctx);", "t < t_end && t != ctx);", 1),
        ),  # a copy from a bad block
        (header, source.replace("sS[row * LDS + col] = tile_ok && ", "sS[row * LDS + col] = ")),
        (header, source + "\n  MUT(T, k_pe)[0] = T(0.0f);\n"),  # a write outside the guard
        (header.replace("(pred) ? *((const device uint4*)(src)) : uint4(0u)", "*((const device uint4*)(src))"), source),
    ]
    for h, s in planted:
        assert (h, s) != (header, source)
        assert bounds_guard_violations(h, s)


def metal_r512_shape() -> tuple[TileConfig, dict[str, int]]:
    """The tiles Metal takes for DeepSeek-V3's attention (R=512, H=128), and its template values."""
    from server.kernels.tiles import choose_config

    cfg = choose_config("metal", 4, 128, 512, 64, 100, 64)
    shape = dict(H=128, HG=cfg.hg, R=512, P=64, GS=64, BS=64, TT=cfg.tt, NW=cfg.nw, NSTAGE=cfg.nstage)
    return cfg, shape


def test_metal_takes_r512_within_32kb_by_reading_queries_from_device_memory() -> None:
    cfg, _ = metal_r512_shape()
    assert (cfg.hg, cfg.tt, cfg.nstage, cfg.q_shared) == (16, 16, 1, False)
    assert cfg.smem_bytes(512, 64, 64) <= 32 * 1024 < TileConfig(16, 16, 4, 1, 1).smem_bytes(512, 64, 64)
    header, _ = METAL.render(SPLIT.body, SPLIT.specialized(cfg.defines()).defines)
    assert "#define MLA_Q_FROM_DEVICE 1" in header and "load_a_q" in header
    assert SPLIT.specialized(TileConfig(32, 64, 8, 4).defines()) is SPLIT  # usual tiles: the same text


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize("launch", [DIRECT, SPLIT], ids=lambda launch: launch.name)
def test_metal_r512_source_type_checks_as_cpp(tmp_path: Path, launch: Launch) -> None:
    cfg, shape = metal_r512_shape()
    tiled = launch.specialized(cfg.defines())
    r = shim_check(tmp_path, tiled, shape, METAL.render(tiled.body, tiled.defines))
    assert r.returncode == 0, r.stderr[-4000:]


@needs_clang
@pytest.mark.parametrize("dtype", ["half", "bfloat"])
@pytest.mark.parametrize("launch", [DIRECT, SPLIT], ids=lambda launch: launch.name)
def test_metal_r512_source_passes_opencl_address_space_checks(tmp_path: Path, launch: Launch, dtype: str) -> None:
    cfg, shape = metal_r512_shape()
    tiled = launch.specialized(cfg.defines())
    header, source = METAL.render(tiled.body, tiled.defines)
    assert metal_errors(tmp_path, tiled, dtype, shape, header, source) == []
