"""Random MLA checkpoints of real model shapes, for benchmarks where only the shapes matter.

Writes config.json + safetensors shards in mlx-lm's layout (experts stacked, `kv_b_proj` already
split into `embed_q` / `unembed_out`), 4-bit affine weights everywhere except the norms, the router
and the two absorbed projections (MLX's CUDA backend has no quantized kernel for those), so that our
server and mlx_lm.server load the same directory. The tokenizer is a word-level vocabulary of the
model's full size ("w0 w1 ..."), so every sampled id decodes.

    python -m server.bench.synthetic_model OUT_DIR [--layers 8] [--shape mistral-small-4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx

from server.engine.model.demo_model import CHAT_TEMPLATE

# Mistral Small 4's attention (H=32, R=256, P=64, as the kernel targets) and MoE shape.
SHAPES: dict[str, dict[str, Any]] = {
    "mistral-small-4": {
        "model_type": "mistral4",
        "vocab_size": 131072,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "n_shared_experts": 1,
        "n_routed_experts": 128,
        "num_experts_per_tok": 4,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 0,
        "q_lora_rank": 1024,
        "kv_lora_rank": 256,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 64,
        "v_head_dim": 128,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "type": "yarn",
            "rope_theta": 10000.0,
            "factor": 16.0,
            "original_max_position_embeddings": 8192,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
    },
}

GROUP, BITS = 64, 4


def write_synthetic_model(path: Path, shape: str = "mistral-small-4", layers: int = 8, seed: int = 0) -> Path:
    c: dict[str, Any] = dict(SHAPES[shape], num_hidden_layers=layers, torch_dtype="bfloat16")
    c["quantization"] = {"group_size": GROUP, "bits": BITS}
    path.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    D, H, V = c["hidden_size"], c["num_attention_heads"], c["vocab_size"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    R, Q, E, M = c["kv_lora_rank"], c["q_lora_rank"], c["n_routed_experts"], c["moe_intermediate_size"]

    shard = {"model.embed_tokens": _quantized((V, D)), "lm_head": _quantized((V, D))}
    w = {"model.norm.weight": mx.ones(D, mx.bfloat16)}
    for name, (q, s, b) in shard.items():
        w.update({f"{name}.weight": q, f"{name}.scales": s, f"{name}.biases": b})
    _save(path, "model-embed.safetensors", w)
    for i in range(layers):
        p = f"model.layers.{i}"
        w = {
            f"{p}.input_layernorm.weight": mx.ones(D, mx.bfloat16),
            f"{p}.post_attention_layernorm.weight": mx.ones(D, mx.bfloat16),
            f"{p}.self_attn.q_a_layernorm.weight": mx.ones(Q, mx.bfloat16),
            f"{p}.self_attn.kv_a_layernorm.weight": mx.ones(R, mx.bfloat16),
            f"{p}.self_attn.embed_q.weight": _dense((H, R, nope)),
            f"{p}.self_attn.unembed_out.weight": _dense((H, v, R)),
            f"{p}.mlp.gate.weight": _dense((E, D)),
        }
        linears = {
            "self_attn.q_a_proj": (Q, D),
            "self_attn.q_b_proj": (H * (nope + rope), Q),
            "self_attn.kv_a_proj_with_mqa": (R + rope, D),
            "self_attn.o_proj": (D, H * v),
            "mlp.switch_mlp.gate_proj": (E, M, D),
            "mlp.switch_mlp.up_proj": (E, M, D),
            "mlp.switch_mlp.down_proj": (E, D, M),
            "mlp.shared_experts.gate_proj": (M, D),
            "mlp.shared_experts.up_proj": (M, D),
            "mlp.shared_experts.down_proj": (D, M),
        }
        for name, shp in linears.items():
            q, s, b = _quantized(shp)
            w.update({f"{p}.{name}.weight": q, f"{p}.{name}.scales": s, f"{p}.{name}.biases": b})
        _save(path, f"model-layer{i:03d}.safetensors", w)
    (path / "config.json").write_text(json.dumps(dict(c, bos_token_id=1, eos_token_id=2), indent=2))
    _write_tokenizer(path, V)
    return path


def _dense(shape: tuple[int, ...]) -> mx.array:
    dense: mx.array = (mx.random.normal(shape) / shape[-1] ** 0.5).astype(mx.bfloat16)
    return dense


def _quantized(shape: tuple[int, ...]) -> tuple[mx.array, mx.array, mx.array]:
    """Random 4-bit codes with a per-tensor scale giving weights of std ~ 1/sqrt(fan_in)."""
    *lead, out_dim, in_dim = shape
    packed = mx.random.randint(-(2**31), 2**31 - 1, (*lead, out_dim, in_dim * BITS // 32), mx.int32).view(mx.uint32)
    scale = (1.0 / in_dim**0.5) / 4.6  # 4.6 ~ std of a uniform code in [-8, 7]
    scales = mx.full((*lead, out_dim, in_dim // GROUP), scale, mx.bfloat16)
    return packed, scales, -8 * scales


def _save(path: Path, name: str, weights: dict[str, mx.array]) -> None:
    mx.eval(weights)
    mx.save_safetensors(str(path / name), weights, metadata={"format": "mlx"})


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", default="mistral-small-4", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args(argv)
    print(write_synthetic_model(args.out, args.shape, args.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
