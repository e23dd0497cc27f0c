"""DeepSeek-V3 (yarn rope, no llama-4 scale) runs through the same MLA path; other
architectures are refused with a message naming the supported ones."""

import json
import shutil

import mlx.core as mx
import pytest
from engine_harness import Collector, demo_model, make_engine, prompt, run_until_idle
from mlx.utils import tree_flatten
from mlx_lm.models import deepseek_v3, llama
from reference_loop import greedy_reference
from support.hardware import needs_reference_decode

from server.engine.demo_model import ensure_demo_model
from server.engine.loader import load_model
from server.engine.sequence import Sequence
from server.engine.types import EngineError, SamplingParams


def tiny_deepseek_v3():
    args = deepseek_v3.ModelArgs(
        model_type="deepseek_v3",
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=2.5,
        kv_lora_rank=128,
        q_lora_rank=64,
        qk_rope_head_dim=16,
        v_head_dim=32,
        qk_nope_head_dim=32,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=4096,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )
    mx.random.seed(7)
    model = deepseek_v3.Model(args)
    mx.eval(model.parameters())
    return model


@needs_reference_decode
def test_deepseek_v3_greedy_matches_reference_loop():
    model = tiny_deepseek_v3()
    ids = prompt(150, seed=4)
    expected = greedy_reference(model, ids, 16)
    _, tokenizer = demo_model()
    engine = make_engine(num_blocks=16, model=model, prefill_chunk_size=64)
    out = Collector()
    engine.add(Sequence("d", ids, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), emit=out))
    run_until_idle(engine)
    assert out.tokens == expected


def test_other_architectures_are_refused_by_name(tmp_path):
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=1,
        intermediate_size=128,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        vocab_size=1024,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    model = llama.Model(args)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp_path / "config.json").write_text(json.dumps({**args.__dict__, "architectures": ["LlamaForCausalLM"]}))
    demo = ensure_demo_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(demo / name, tmp_path / name)
    with pytest.raises(EngineError, match="'llama'.*mistral4, deepseek_v3"):
        load_model(str(tmp_path))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(EngineError, match="model not found"):
        load_model(str(tmp_path / "nowhere"))
