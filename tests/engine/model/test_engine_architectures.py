"""Every architecture in server/engine/model/architectures.py runs through the engine with the same
greedy tokens as mlx-lm's own forward pass over the same INT4 latent (tests/support/reference_loop.py):
tiny random models built from mlx-lm's own classes, prompts of mixed lengths in one batch, with
chunked prefill. Hybrids and sparse-indexer models are refused by name, with the reason; other
architectures with the list of supported ones."""

import json
import shutil
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.models import (
    deepseek_v2,
    deepseek_v3,
    deepseek_v32,
    glm4_moe_lite,
    kimi_k25,
    kimi_linear,
    kimi_vl,
    llama,
    longcat_flash,
    minicpm3,
    youtu_llm,
)
from support.engine_harness import demo_engine_model, demo_model, make_engine, prompt
from support.hardware import needs_reference_decode
from support.reference_loop import greedy_reference

from server.engine.factory import engine_model
from server.engine.model.architectures import (
    REFUSED,
    REGISTRY,
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitecture,
    adapt_model,
    check_supported,
    split_kv_b_proj,
)
from server.engine.model.demo_model import ensure_demo_model
from server.engine.model.loader import load_model
from server.engine.model.model_runner import ModelRunner
from server.engine.types import EngineError, SamplingParams

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

VOCAB = 1024
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 1024,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
MLA = dict(kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
DEEPSEEK_V3_TEXT = dict(
    model_type="deepseek_v3",
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    q_lora_rank=64,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=4096,
    rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
    **MLA,
)


def _built(module, seed: int = 7, **args):
    """mlx-lm's `module.Model` with random weights; routers (zero at init) randomized too, so
    routing differs from token to token."""
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(args))

    def fill(path, p):
        if path.endswith(("gate.weight", "classifier.weight")) or path.endswith("e_score_correction_bias"):
            return 0.5 * mx.random.normal(p.shape).astype(p.dtype)
        return p

    model.update(tree_map_with_path(fill, model.parameters()))
    mx.eval(model.parameters())
    return model


def tiny_deepseek_v3():
    return _built(deepseek_v3, **DEEPSEEK_V3_TEXT)


def tiny_glm4_moe_lite():
    return _built(
        glm4_moe_lite,
        **{**DEEPSEEK_V3_TEXT, "model_type": "glm4_moe_lite", "v_head_dim": 48, "rope_scaling": None},
    )


def tiny_kimi_k25():
    return _built(kimi_k25, model_type="kimi_k25", text_config={**DEEPSEEK_V3_TEXT, "model_type": "kimi_k2"})


def tiny_kimi_vl():
    return _built(kimi_vl, model_type="kimi_vl", text_config=DEEPSEEK_V3_TEXT)


def tiny_deepseek_v2():  # V2-Lite's shape: no q LoRA, yarn with mscale, greedy top-k routing
    return _built(
        deepseek_v2,
        **{
            **DEEPSEEK_V3_TEXT,
            "model_type": "deepseek_v2",
            "q_lora_rank": None,
            "topk_method": "greedy",
            "n_group": None,
            "topk_group": None,
            "rope_scaling": YARN,
        },
    )


def tiny_youtu_llm(tie_word_embeddings: bool = False):
    return _built(
        youtu_llm,
        model_type="youtu_llm",
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=64,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        **MLA,
    )


def tiny_youtu_llm_tied():
    """Youtu-LLM's own tied embeddings; the layers' outputs scaled up so that greedy decoding does
    not settle on repeating one token."""
    model = tiny_youtu_llm(tie_word_embeddings=True)
    big = tree_map_with_path(
        lambda p, w: w * 6 if p.endswith(("o_proj.weight", "down_proj.weight")) else w, model.parameters()
    )
    model.update(big)
    mx.eval(model.parameters())
    return model


def tiny_minicpm3():
    half = MLA["qk_rope_head_dim"] // 2
    return _built(
        minicpm3,
        model_type="minicpm3",
        vocab_size=VOCAB,
        hidden_size=128,
        dim_model_base=32,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        q_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        kv_lora_rank=128,
        scale_depth=4.0,  # MiniCPM3-4B: 1.4 over 62 layers; here 4 / sqrt(2), far from 1
        scale_emb=12,
        max_position_embeddings=4096,
        rope_scaling={
            "type": "longrope",
            "original_max_position_embeddings": 1024,
            "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.0 + 0.1 * i for i in range(half)],
        },
        tie_word_embeddings=False,
    )


def tiny_longcat_flash():
    return _built(
        longcat_flash,
        model_type="longcat_flash",
        attention_method="MLA",
        zero_expert_type="identity",
        hidden_size=256,  # latent scale sqrt(256 / 128), q scale sqrt(256 / 64)
        ffn_hidden_size=256,
        moe_topk=2,
        expert_ffn_hidden_size=64,
        n_routed_experts=8,
        zero_expert_num=2,
        num_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        num_attention_heads=4,
        q_lora_rank=64,
        routed_scaling_factor=2.0,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        mla_scale_q_lora=True,
        mla_scale_kv_lora=True,
        attention_bias=False,
        **MLA,
    )


TINY = {
    "deepseek_v3": tiny_deepseek_v3,
    "glm4_moe_lite": tiny_glm4_moe_lite,
    "kimi_k25": tiny_kimi_k25,
    "kimi_vl": tiny_kimi_vl,
    "deepseek_v2": tiny_deepseek_v2,
    "youtu_llm": tiny_youtu_llm,
    "youtu_llm-tied": tiny_youtu_llm_tied,
    "minicpm3": tiny_minicpm3,
    "longcat_flash": tiny_longcat_flash,
}
LENGTHS = (150, 37, 90, 5)  # one batch: chunked (64) and single-chunk prefills, then mixed decodes


@needs_reference_decode
@pytest.mark.parametrize("family", sorted(TINY))
def test_greedy_matches_reference_loop_in_a_mixed_batch(family):
    model = TINY[family]()
    prompts = [prompt(n, seed=3 + i) for i, n in enumerate(LENGTHS)]
    expected = [greedy_reference(model, ids, 12) for ids in prompts]
    engine = make_engine(num_blocks=16, model=engine_model(model), prefill_chunk_size=64, max_num_batched_tokens=96)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected


def test_every_family_is_tested_and_keeps_its_family_once_adapted():
    from server.engine.model.architectures import REGISTRY

    assert set(REGISTRY) == {name.split("-")[0] for name in TINY} | {"mistral4"}  # mistral4: the demo model
    model = tiny_kimi_k25()
    adapted = adapt_model(model)
    assert adapted is model.language_model
    assert check_supported(adapted).family == "kimi_k25"


@pytest.mark.parametrize("family", ["mistral4", "deepseek_v3", "glm4_moe_lite", "kimi_k25", "kimi_vl", "deepseek_v2"])
def test_the_architectures_router_routes_as_the_models_own_moe_layer(family):
    """Where the runner routes a MoE layer itself (experts one at a time, a profiler's parts), it
    routes through the architecture's `route`: the layer's own output."""
    model = demo_engine_model()[0] if family == "mistral4" else engine_model(TINY[family]())
    runner = ModelRunner(model, num_blocks=2, decode_backend="cpu")
    mlp = next(layer.mlp for layer in runner.inner.layers if hasattr(layer.mlp, "switch_mlp"))
    x = mx.random.normal((7, runner.model.args.hidden_size), key=mx.random.key(1)).astype(runner.dtype)
    parts: list[str] = []
    split = runner._mlp(mlp, x, lambda name, *arrays: parts.append(name))
    assert "router" in parts and "experts" in parts
    assert mx.allclose(split, mlp(x[None])[0], atol=1e-4).item()


def test_mistral4_scales_queries_by_position_as_mlx_lm_does():
    from mlx_lm.models.ministral3 import _get_llama_4_attn_scale

    args = demo_model()[0].args
    rope = args.rope_parameters
    want = _get_llama_4_attn_scale(1000, 0, rope["llama_4_scaling_beta"], rope["original_max_position_embeddings"])
    got = REGISTRY["mistral4"].attn_scale(args)(mx.arange(1000))
    assert got.shape == (1000, 1, 1) and mx.allclose(got.reshape(-1), want.reshape(-1)).item()
    assert got[255].item() == 1.0 and got[256].item() > 1.0  # the demo's step at 256 positions
    without = {k: v for k, v in rope.items() if k != "llama_4_scaling_beta"}
    assert REGISTRY["mistral4"].attn_scale(SimpleNamespace(rope_parameters=without)) is None
    assert all(a.attn_scale(args) is None for a in REGISTRY.values() if a.family != "mistral4")


@pytest.mark.parametrize("build", [tiny_deepseek_v3, tiny_longcat_flash])
def test_on_cuda_the_loader_unquantizes_every_attentions_absorbed_halves(build, monkeypatch):
    """MLX's CUDA backend has no quantized matmul for `embed_q` / `unembed_out`: the loader makes
    them float in each of a layer's attentions, as its architecture lists them (longcat: two)."""
    from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear

    from server.engine.model import loader

    model = build()
    nn.quantize(model, 32, 4, class_predicate=lambda _, m: isinstance(m, MultiLinear))
    assert any(isinstance(m, QuantizedMultiLinear) for _, m in model.named_modules())
    monkeypatch.setattr(loader, "no_quantized_multilinear", lambda: True)
    loader._unquantize_absorbed_on_cuda(model, check_supported(model))
    assert not [name for name, m in model.named_modules() if isinstance(m, QuantizedMultiLinear)]


def test_kv_b_proj_split_matches_the_whole_projection():
    """The split halves give the per-head keys and values mlx-lm's whole kv_b_proj gives, also
    from a 4-bit kv_b_proj (dequantized, split, requantized with the same bits and group size)."""
    H, nope, v, R = 4, 64, 64, 128
    mx.random.seed(1)
    whole = nn.Linear(R, H * (nope + v), bias=False)
    latent = mx.random.normal((5, R))
    for proj in (whole, nn.QuantizedLinear.from_linear(whole, 64, 4)):
        kv = proj(latent).reshape(5, H, nope + v)
        embed_q, unembed_out = split_kv_b_proj(proj, H, nope)
        k_nope = embed_q(latent[None], transpose=False).swapaxes(0, 1)  # [5, H, nope]
        values = unembed_out(latent[None]).swapaxes(0, 1)  # [5, H, v]
        tol = 1e-4 if proj is whole else 0.1  # requantizing the halves rounds again
        assert mx.allclose(k_nope, kv[..., :nope], atol=tol).item()
        assert mx.allclose(values, kv[..., nope:], atol=tol).item()


def _save(tmp_path, model, config):
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp_path / "config.json").write_text(json.dumps(config))
    demo = ensure_demo_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(demo / name, tmp_path / name)


def test_other_architectures_are_refused_with_the_supported_list(tmp_path):
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=1,
        intermediate_size=128,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    _save(tmp_path, llama.Model(args), {**args.__dict__, "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(EngineError, match="'llama'.*mistral4, deepseek_v3, .*deepseek_v2, minicpm3, youtu_llm"):
        load_model(str(tmp_path))


def test_a_remapped_type_loads_from_disk(tmp_path):
    """A Kimi K2 config says `kimi_k2`, which mlx-lm loads as deepseek_v3: served, and loads
    lazily then whole."""
    model = tiny_deepseek_v3()
    _save(tmp_path, model, {**DEEPSEEK_V3_TEXT, "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"]})
    loaded, _ = load_model(str(tmp_path))
    assert check_supported(loaded).family == "deepseek_v3" and "kimi_k2" in SUPPORTED_ARCHITECTURES


def tiny_deepseek_v32():
    return deepseek_v32.Model(
        deepseek_v32.ModelArgs.from_dict(
            {**DEEPSEEK_V3_TEXT, "model_type": "deepseek_v32", "index_n_heads": 2, "index_head_dim": 32}
        )
    )


def tiny_kimi_linear():
    return kimi_linear.Model(
        kimi_linear.ModelArgs.from_dict(
            {
                **DEEPSEEK_V3_TEXT,
                "model_type": "kimi_linear",
                "head_dim": 32,
                "rope_theta": 10000.0,
                "rms_norm_eps": 1e-5,
                "model_max_length": 4096,
                "num_experts": 8,
                "linear_attn_config": {"kda_layers": [1], "full_attn_layers": [2], "num_heads": 4, "head_dim": 32},
            }
        )
    )


@pytest.mark.parametrize(
    "build, name, why",
    [(tiny_deepseek_v32, "deepseek_v32", "indexer"), (tiny_kimi_linear, "kimi_linear", "linear attention")],
)
def test_hybrid_and_sparse_indexer_models_are_refused_by_name(build, name, why):
    with pytest.raises(UnsupportedArchitecture, match=f"'{name}' is not served: .*{why}.*Supported: mistral4"):
        make_engine(num_blocks=4, model=engine_model(build()))


def test_refusals_cover_every_mla_type_not_served():
    import pathlib

    import mlx_lm.models

    root = pathlib.Path(mlx_lm.models.__file__).parent
    mla = {p.stem for p in root.glob("*.py") if "kv_lora_rank" in p.read_text()}

    assert mla - set(REGISTRY) <= set(REFUSED), mla - set(REGISTRY) - set(REFUSED)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(EngineError, match="model not found"):
        load_model(str(tmp_path / "nowhere"))


@needs_reference_decode
def test_deepseek_v2_through_http_matches_reference_loop(serve_app):
    """DeepSeek-V2 (kv_b_proj split at load) through uvicorn and the openai SDK: completions from
    token ids, plain and streamed at once, give the reference loop's greedy text (special tokens
    skipped, as the server does)."""
    import asyncio

    import openai

    from server.api.app import create_app
    from server.engine.args import EngineArgs
    from server.engine.async_engine import AsyncEngine
    from server.engine.factory import load_engine

    _, tokenizer = demo_model()
    prompts = [prompt(150, seed=11), prompt(23, seed=12)]
    expected = [greedy_reference(tiny_deepseek_v2(), ids, 12) for ids in prompts]
    assert all(tokenizer.eos_token_id not in e for e in expected)
    # MLX arrays belong to the thread that made them: the engine's model is built on its thread.
    args = EngineArgs(cache_tokens=64 * 16, max_num_seqs=4, prefill_chunk_size=64)
    engine = AsyncEngine(lambda: load_engine(args, loaded=(engine_model(tiny_deepseek_v2()), tokenizer)))
    base = serve_app(create_app(engine))

    async def plain(client, ids):
        reply = await client.completions.create(model=engine.model_name, prompt=ids, max_tokens=12, temperature=0)
        return reply.choices[0].text, reply.choices[0].finish_reason

    async def streamed(client, ids):
        chunks = await client.completions.create(
            model=engine.model_name, prompt=ids, max_tokens=12, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in chunks if c.choices]), "length"

    async def both():
        # The client closes on the loop that opened its connections: left to the garbage collector,
        # openai's finaliser schedules the close on whatever loop runs next, a later test's.
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(
                plain(client, prompts[0]), streamed(client, prompts[1]), streamed(client, prompts[0])
            )

    got = asyncio.run(both())
    want = [tokenizer.decode(e, skip_special_tokens=True) for e in (expected[0], expected[1], expected[0])]
    assert got == [(w, "length") for w in want]
