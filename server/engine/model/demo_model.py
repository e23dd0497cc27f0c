"""The embedded default model: a small `mistral4` trained on the King James Bible, in Hugging Face layout.

It has every structural feature of Mistral Small 4 (q_lora, kv_lora_rank, rope and nope heads, a MoE
with a shared expert after a dense first layer, yarn rope with llama-4 attention scaling) at toy size,
so the server starts in seconds on any machine and serves through exactly the code path a real
`--model` takes: config.json + safetensors + tokenizer files, loaded by mlx-lm's own loader.

The trained weights (bf16, about 3.6 M parameters) and their byte-level BPE tokenizer ship in
`demo_weights/`, written by `python -m server.bench.train_demo` (docs/quality.md). They are written
out in bf16 where MLX runs on a GPU (so the fused decode kernel runs) and in float32 on a CPU (MLX's
CPU `gather_mm`, which the MoE uses, takes float32 only).

`ensure_demo_model(random=True)` is the earlier random model (deterministic float32 weights, the
tokenizer trained on `_CORPUS`): for shape-only benchmarks and tests that want its exact behaviour.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ...platform import current_platform

VERSION = "5"  # the trained model (5: a 128K context, which coding agents' prompts and answers need)
RANDOM_VERSION = "3"  # the random model
WEIGHTS_DIR = Path(__file__).parent / "demo_weights"

# The random model's configuration (the trained model's is demo_weights/config.json).
CONFIG: dict[str, Any] = {
    "architectures": ["Mistral4ForCausalLM"],
    "model_type": "mistral4",
    "torch_dtype": "float32",
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "q_lora_rank": 64,
    "kv_lora_rank": 128,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    # A small original context makes the llama-4 scale change inside short test prompts (at 256).
    "rope_parameters": {
        "type": "yarn",
        "rope_theta": 10000.0,
        "factor": 128.0,
        "original_max_position_embeddings": 256,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    },
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
# Mistral's tool syntax, added after training so the trained tokens keep their ids (the vocabulary
# the trainer fills is smaller than CONFIG's vocab_size, so the ids stay inside the embedding).
TOOL_TOKENS = ["[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[ARGS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]

# Mistral's layout (v11+ tokenizers): the tools before the last user message, each assistant
# call as [TOOL_CALLS]name[ARGS]{arguments}, tool results between [TOOL_RESULTS] markers. The
# "[TOOL_CALLS]" in it is how mlx-lm's loader picks its `mistral` tool parser for this tokenizer.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(last_user=-1) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'] }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}"
    "{% if tools and loop.index0 == ns.last_user %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST]{{ message['content'] }}[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}[TOOL_CALLS]{{ call['function']['name'] }}[ARGS]"
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}{% endfor %}{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}[TOOL_RESULTS]{{ message['content'] }}[/TOOL_RESULTS]"
    "{% endif %}"
    "{% endfor %}"
)

# Training text for the byte-level BPE: English, code, and some multi-byte scripts so that merges
# exist for them too.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A server streams tokens to its clients as soon as
they are ready, and every request shares the same batch on the accelerator. Multi-head latent
attention stores one compressed latent per token instead of keys and values for every head.
The cache is quantized to four bits with a scale and a bias for every group of sixty-four values.
def attention(query, keys, values): return softmax(query @ keys.T) @ values
for i in range(10): print(i, i * i)  # squares
{"role": "user", "content": "Hello, how are you today?"}
Once upon a time there was a small model that wanted to talk. It said hello to the world.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828
日本語のテキストも少し含めます。こんにちは世界。 中文文本：你好，世界。 한국어: 안녕하세요
Emoji: 😀 🚀 ✨ 👍🏽 ❤️  Accents: café naïve résumé Zürich São Paulo
"""


def cache_root() -> Path:
    base = os.environ.get("MLA_SERVER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mla-server"
    )
    return Path(base)


def demo_dtype() -> str:
    """The trained model's dtype on this machine: bf16 on a GPU, float32 on a CPU (see above)."""
    return "bfloat16" if current_platform().is_gpu else "float32"


def ensure_demo_model(root: Path | None = None, random: bool = False) -> Path:
    """Return the demo model's directory, writing it first if absent. Safe to call concurrently.

    The trained model by default; `random=True`: the random model (shape-only benchmarks)."""
    name = f"demo-mistral4-random-v{RANDOM_VERSION}" if random else f"demo-mistral4-v{VERSION}-{demo_dtype()}"
    target = (root or cache_root()) / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        if random:
            write_demo_model(staging)
        else:
            write_trained_model(staging, demo_dtype())
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_trained_model(path: Path, dtype: str = "bfloat16") -> None:
    """The trained model from demo_weights/, its weights in `dtype` ("bfloat16" or "float32")."""
    import mlx.core as mx

    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(WEIGHTS_DIR / "tokenizer.json", path / "tokenizer.json")
    _write_tokenizer_config(path, json.loads((WEIGHTS_DIR / "config.json").read_text())["max_position_embeddings"])
    config = dict(
        json.loads((WEIGHTS_DIR / "config.json").read_text()), torch_dtype=dtype, bos_token_id=1, eos_token_id=2
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    weights = mx.load(str(WEIGHTS_DIR / "model.safetensors"))
    assert isinstance(weights, dict)
    cast = {k: v.astype(getattr(mx, dtype)) for k, v in weights.items()}
    mx.save_safetensors(str(path / "model.safetensors"), cast, metadata={"format": "pt"})


def write_demo_model(path: Path) -> None:
    """The random model."""
    path.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(path)
    config = dict(CONFIG, bos_token_id=1, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    from safetensors.numpy import save_file

    save_file(_weights(CONFIG), str(path / "model.safetensors"), metadata={"format": "pt"})


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer)
    tok.add_special_tokens(TOOL_TOKENS)
    if tok.get_vocab_size() > CONFIG["vocab_size"]:
        raise ValueError("the demo tokenizer outgrew the model's vocab_size")
    tok.save(str(path / "tokenizer.json"))
    _write_tokenizer_config(path, CONFIG["max_position_embeddings"])


def _write_tokenizer_config(path: Path, max_len: int) -> None:
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _weights(c: dict[str, Any]) -> dict[str, np.ndarray]:
    """Deterministic random weights, named as a Hugging Face Mistral 4 checkpoint names them."""
    rng = np.random.default_rng(20261126)
    dtype = np.float32

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        w: np.ndarray = (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(dtype)
        return w

    def norm(dim: int) -> np.ndarray:
        return np.ones(dim, dtype)

    D, H = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    R, Q = c["kv_lora_rank"], c["q_lora_rank"]
    w = {
        "model.embed_tokens.weight": rng.standard_normal((c["vocab_size"], D)).astype(dtype),
        "model.norm.weight": norm(D),
        "lm_head.weight": linear(c["vocab_size"], D),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm(D)
        w[f"{p}.post_attention_layernorm.weight"] = norm(D)
        a = f"{p}.self_attn"
        w[f"{a}.q_a_proj.weight"] = linear(Q, D)
        w[f"{a}.q_a_layernorm.weight"] = norm(Q)
        w[f"{a}.q_b_proj.weight"] = linear(H * (nope + rope), Q)
        w[f"{a}.kv_a_proj_with_mqa.weight"] = linear(R + rope, D)
        w[f"{a}.kv_a_layernorm.weight"] = norm(R)
        w[f"{a}.kv_b_proj.weight"] = linear(H * (nope + v), R)
        w[f"{a}.o_proj.weight"] = linear(D, H * v)
        m = f"{p}.mlp"
        if i < c["first_k_dense_replace"]:
            _mlp(w, m, c["intermediate_size"], D, linear)
            continue
        w[f"{m}.gate.weight"] = linear(c["n_routed_experts"], D)
        for e in range(c["n_routed_experts"]):
            _mlp(w, f"{m}.experts.{e}", c["moe_intermediate_size"], D, linear)
        shared = c["moe_intermediate_size"] * c["n_shared_experts"]
        _mlp(w, f"{m}.shared_experts", shared, D, linear)
    return w


def _mlp(
    w: dict[str, np.ndarray], prefix: str, hidden: int, dim: int, linear: Callable[[int, int], np.ndarray]
) -> None:
    w[f"{prefix}.gate_proj.weight"] = linear(hidden, dim)
    w[f"{prefix}.up_proj.weight"] = linear(hidden, dim)
    w[f"{prefix}.down_proj.weight"] = linear(dim, hidden)
