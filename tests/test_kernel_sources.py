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


def cuda_translation_unit(kind: str, dtype: str, consts: dict[str, int]) -> str:
    """What MLX's cuda_kernel builds from (header, source): includes, header, a kernel whose
    parameters are the inputs as const pointers then the outputs, template constants, body."""
    typ = lambda t: CUDA_TYPES[dtype] if t == "T" else CUDA_TYPES[t]  # noqa: E731
    if kind == "combine":
        body, params, outputs, defines = mla_body.COMBINE, COMBINE_INPUTS, [("out", "T")], {}
    else:
        body, params = mla_body.PARTIAL, PARTIAL_INPUTS
        direct = kind == "direct"
        outputs = [("out", "T")] if direct else [("o_part", "float"), ("ml_part", "float")]
        defines = {"MLA_DIRECT": int(direct)}
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
