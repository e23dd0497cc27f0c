"""Which of mlx-lm's latent-attention (MLA) models the engine serves, and how each maps onto it.

The engine runs every model the same way (model_runner.py): embeddings, then per layer
`h += mla_attention(layer.self_attn, layer.input_layernorm(h))` and
`h += layer.mlp(layer.post_attention_layernorm(h))`, then the final norm and `lm_head` (or the
tied embeddings). `mla_attention` reads the absorbed form of a layer's attention: the query path
(`q_proj`, or `q_a_proj` / `q_a_layernorm` / `q_b_proj`), `kv_a_proj_with_mqa`, `kv_a_layernorm`,
`embed_q` / `unembed_out` (the two halves of `kv_b_proj`, as mlx-lm's `MultiLinear`), `rope`,
`scale`, `o_proj` and the head sizes.

Each family is one `Architecture` entry of `REGISTRY`, which holds everything model-specific the
engine needs; a new model type is one entry. Its adapter turns the model mlx-lm loaded (mlx-lm's
classes and `sanitize` stay the source of truth for the weights) into that shape, in place, once;
its hooks answer what the runner and the loader would otherwise ask of the model's class: how a
MoE layer routes (`route`), a query scale by position (`attn_scale`), and which modules of a
decoder layer are attentions (`attentions`). The adapters:

- `mistral4`, `deepseek_v3` (Kimi K2 configs say `kimi_k2`), `glm4_moe_lite`: mlx-lm's own
  attention already has the absorbed form; nothing to do.
- `kimi_k25`, `kimi_vl`: a DeepSeek-V3 text model inside a vision-language wrapper; the engine
  runs the text model (the vision tower is not loaded by mlx-lm's text loader anyway).
- `deepseek_v2`, `youtu_llm`, `minicpm3`: keep `kv_b_proj` whole and cache per-head keys and
  values; the adapter splits `kv_b_proj` into `embed_q` / `unembed_out` (quantized weights are
  dequantized, split and requantized with the same bits and group size) and puts an `MLAView` in
  place of `self_attn`. MiniCPM3's embedding scale, residual scale (`scale_depth / sqrt(layers)`)
  and logit scale are kept by thin wrappers, so the arithmetic is mlx-lm's.
- `longcat_flash`: each decoder layer holds two attention+MLP blocks and a MoE whose input is the
  first block's MLP input and whose output joins after the second; the adapter unrolls each into
  two engine layers (two latent caches) and carries the MoE output from the first to the second.
  Its q and latent scales (`mla_scale_q_lora`, `mla_scale_kv_lora`) go into the view; the scaled
  latent is what the cache holds, as in mlx-lm.

And the hooks that differ from the defaults: `mistral4` routes through mlx-lm's
`mistral4_expert_select` over a plain linear router (the others' `MoEGate` routes itself), and
scales queries by position (`llama_4_scaling_beta`); `longcat_flash` has two attentions per layer.

Refused at load, by name and with the reason (no silent dense fallback): hybrids whose other
layers use linear attention (`kimi_linear`, `kimi_k3`, `bailing_hybrid`, `bailing_moe_v3`),
sparse-indexer models (`deepseek_v32`, `glm_moe_dsa`, `deepseek_v41`), and `longcat_flash_ngram`
(its n-gram embeddings read each sequence's earlier tokens). Any other type is refused with the
list of supported ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.nn.layers.base import Module

from ...platform import current_platform
from ..types import EngineError
from .experts import fuse_experts

_ADAPTED = "_mla_family"  # set on the model the engine runs: the family it was adapted as


# A MoE layer's routing of tokens [T, D]: (expert indices [T, k], their weights [T, k]).
Route = Callable[[Any, mx.array], tuple[mx.array, mx.array]]
# A per-token query scale [T, 1, 1] from the tokens' positions [T].
PositionScale = Callable[[mx.array], mx.array]


def _gate_routes(mlp: Any, x: mx.array) -> tuple[mx.array, mx.array]:
    """deepseek_v3's `MoEGate` (and its kin's) returns the routing itself."""
    routed: tuple[mx.array, mx.array] = mlp.gate(x)
    return routed


def _no_attn_scale(args: Any) -> PositionScale | None:
    return None


def _one_attention(layer: Any) -> list[Any]:
    return [layer.self_attn]


@dataclass(frozen=True)
class Architecture:
    family: str  # mlx-lm's module (mlx_lm.models.<family>) whose Model class it adapts
    model_types: tuple[str, ...]  # config.json `model_type` values that load into that module
    checkpoints: str  # real checkpoints it covers, for the docs
    adapt: Callable[[Any], Any]  # mlx-lm's Model -> the model the engine runs (may be the same)
    # How a MoE layer (one with `switch_mlp`) picks experts, where the runner runs the experts
    # itself (one at a time, or part by part for a profiler) instead of calling the layer.
    route: Route = _gate_routes
    # The model's query scale by position, from its args (the adapted model's `args`); None: none.
    attn_scale: Callable[[Any], PositionScale | None] = _no_attn_scale
    # The attention modules of one of mlx-lm's decoder layers, before `adapt`.
    attentions: Callable[[Any], list[Any]] = _one_attention


class UnsupportedArchitecture(EngineError):
    """A model type the engine does not serve; the message says why and what is supported."""


def _keep(model: Any) -> Any:
    return model


def _mistral4_route(mlp: Any, x: mx.array) -> tuple[mx.array, mx.array]:
    """mistral4: a plain linear router, whose scores mlx-lm's `mistral4_expert_select` turns into
    a routing (as its MoE layer does)."""
    from mlx_lm.models.mistral4 import mistral4_expert_select

    a = mlp.args
    routed: tuple[mx.array, mx.array] = mistral4_expert_select(
        mlp.gate(x), mlp.num_experts_per_tok, a.n_group, a.topk_group, a.routed_scaling_factor, a.norm_topk_prob
    )
    return routed


def _llama4_attn_scale(args: Any) -> PositionScale | None:
    """mistral4's query scale 1 + beta * log(1 + floor(pos / original_max)), where its rope
    parameters name a `llama_4_scaling_beta`."""
    rope = getattr(args, "rope_parameters", None) or {}
    if "llama_4_scaling_beta" not in rope:
        return None
    beta: float = rope["llama_4_scaling_beta"]
    original_max: int = rope["original_max_position_embeddings"]

    def scale(positions: mx.array) -> mx.array:
        s = 1 + beta * mx.log(1 + mx.floor(positions.astype(mx.float32) / original_max))
        return s[:, None, None]

    return scale


def _text_model(model: Any) -> Any:
    """The DeepSeek-V3 language model inside a Kimi vision-language wrapper."""
    text = model.language_model
    if getattr(text.args, "model_type", None) is None:  # kimi_vl's text config has none
        text.args.model_type = model.args.model_type
    return text


class MLAView(Module):
    """What `mla_attention` reads of one layer's attention, in the absorbed form.

    Holds the attention's own modules (no copies) and, where the model keeps `kv_b_proj` whole,
    the two halves split from it."""

    def __init__(
        self,
        attn: Any,
        *,
        num_heads: int,
        scale: float,
        embed_q: Module,
        unembed_out: Module,
        q_scale: float | None = None,
        latent_scale: float | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.num_heads = num_heads
        self.qk_nope_head_dim: int = attn.qk_nope_head_dim
        self.qk_rope_head_dim: int = attn.qk_rope_head_dim
        self.kv_lora_rank: int = attn.kv_lora_rank
        self.q_lora_rank: int | None = attn.q_lora_rank
        self.scale = scale
        if self.q_lora_rank is None:
            self.q_proj = _scaled(attn.q_proj, q_scale)
        else:
            self.q_a_proj = attn.q_a_proj
            self.q_a_layernorm = attn.q_a_layernorm
            self.q_b_proj = _scaled(attn.q_b_proj, q_scale)
        self.kv_a_proj_with_mqa = attn.kv_a_proj_with_mqa
        self.kv_a_layernorm = _scaled(attn.kv_a_layernorm, latent_scale)
        self.embed_q = embed_q
        self.unembed_out = unembed_out
        self.rope = attn.rope
        self.o_proj = attn.o_proj


class Scaled(Module):
    """`inner(x) * factor`, or `inner(x / divisor)`: a model's constant scales, kept where mlx-lm
    applies them so the engine's arithmetic is mlx-lm's."""

    def __init__(self, inner: Module, factor: float = 1.0, divisor: float = 1.0) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.inner = inner
        self.factor = factor
        self.divisor = divisor

    def __call__(self, x: mx.array) -> mx.array:
        y: mx.array = self.inner(x / self.divisor if self.divisor != 1.0 else x)
        return y * self.factor if self.factor != 1.0 else y

    def as_linear(self, x: mx.array) -> mx.array:  # tied embeddings: the logits are unscaled
        out: mx.array = self.inner.as_linear(x)
        return out


def _scaled(module: Module, factor: float | None) -> Module:
    return module if factor is None or factor == 1.0 else Scaled(module, factor)


def split_kv_b_proj(kv_b_proj: Module, num_heads: int, nope: int) -> tuple[Module, Module]:
    """`kv_b_proj` ([H * (nope + v), R]) -> (`embed_q` [H, R, nope], `unembed_out` [H, v, R]) as
    mlx-lm's `MultiLinear`; a quantized projection gives quantized halves (same bits and group
    size) where the group size divides each half's inner dimension."""
    from mlx_lm.models.mla import MultiLinear

    q = kv_b_proj  # nn.Linear or nn.QuantizedLinear, or their sharded forms
    quantized = "scales" in q
    if quantized:
        mode = getattr(q, "mode", "affine")
        w = mx.dequantize(q.weight, q.scales, q.get("biases"), q.group_size, q.bits, mode=mode)
        w = w.astype(q.scales.dtype)
    else:
        w = q.weight
    w = w.reshape(num_heads, -1, w.shape[-1])
    halves = []
    for part in (mx.contiguous(w[:, :nope, :].swapaxes(-1, -2)), mx.contiguous(w[:, nope:, :])):
        lin = MultiLinear(part.shape[-1], part.shape[-2], num_heads)
        lin.weight = part
        if quantized and part.shape[-1] % q.group_size == 0 and not no_quantized_multilinear():
            halves.append(lin.to_quantized(q.group_size, q.bits, mode))
        else:
            halves.append(lin)
    mx.eval(halves[0].parameters(), halves[1].parameters())
    return halves[0], halves[1]


def no_quantized_multilinear() -> bool:
    """MLX's CUDA backend has no quantized matmul with transpose=False (`embed_q` in prefill)."""
    return current_platform().backend == "cuda"


def _split_view(attn: Any, scale: float) -> MLAView:
    num_heads = attn.num_heads
    embed_q, unembed_out = split_kv_b_proj(attn.kv_b_proj, num_heads, attn.qk_nope_head_dim)
    return MLAView(attn, num_heads=num_heads, scale=scale, embed_q=embed_q, unembed_out=unembed_out)


def _adapt_deepseek_v2(model: Any) -> Any:
    """DeepSeek-V2 / V2-Lite / V2.5: yarn rope with its mscale inside `rope` (mlx-lm's
    `DeepseekV2YarnRotaryEmbedding`), softmax scale with mscale_all_dim already in `scale`."""
    for layer in model.model.layers:
        layer.self_attn = _split_view(layer.self_attn, layer.self_attn.scale)
    return model


def _adapt_youtu_llm(model: Any) -> Any:
    model.args = model.config  # mlx-lm names it `config`; the engine reads `args`
    return _adapt_deepseek_v2(model)


def _adapt_minicpm3(model: Any) -> Any:
    """MiniCPM3: `softmax_scale`, v heads of hidden/heads, embeddings times `scale_emb`, each
    residual branch times `scale_depth / sqrt(layers)`, untied logits over h / (hidden / base)."""
    args = model.args
    depth = args.scale_depth / (args.num_hidden_layers**0.5)
    for layer in model.model.layers:
        attn = layer.self_attn
        view = _split_view(attn, attn.softmax_scale)
        view.o_proj = Scaled(attn.o_proj, factor=depth)
        layer.self_attn = view
        layer.mlp = Scaled(layer.mlp, factor=depth)
    model.model.embed_tokens = Scaled(model.model.embed_tokens, factor=args.scale_emb)
    if not args.tie_word_embeddings:
        model.lm_head = Scaled(model.lm_head, divisor=args.hidden_size / args.dim_model_base)
    return model


class _Carry:
    """The LongCat-Flash shortcut MoE's output, from a layer's first block to its second."""

    value: mx.array | None = None


class _ShortcutFirst(Module):
    # Carries state to the next call: its tokens must go in one call (see ModelRunner._mlp).
    tokens_in_parts = False

    def __init__(self, mlp: Module, moe: Module, carry: _Carry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.dense = mlp
        self.moe = moe
        self.carry = carry

    def __call__(self, x: mx.array) -> mx.array:
        self.carry.value = self.moe(x)
        out: mx.array = self.dense(x)
        return out


class _ShortcutSecond(Module):
    tokens_in_parts = False  # as _ShortcutFirst

    def __init__(self, mlp: Module, carry: _Carry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.dense = mlp
        self.carry = carry

    def __call__(self, x: mx.array) -> mx.array:
        shortcut, self.carry.value = self.carry.value, None
        assert shortcut is not None, "the first block of the layer runs first"
        out: mx.array = self.dense(x) + shortcut
        return out


class _Block(Module):
    """One attention + MLP block, the unit the engine's layer loop runs."""

    def __init__(self, self_attn: Module, input_layernorm: Module, mlp: Module, post: Module) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.self_attn = self_attn
        self.input_layernorm = input_layernorm
        self.mlp = mlp
        self.post_attention_layernorm = post


def _two_attentions(layer: Any) -> list[Any]:
    return list(layer.self_attn)


def _adapt_longcat_flash(model: Any) -> Any:
    """LongCat-Flash: each decoder layer becomes two engine layers (two latent caches)."""
    blocks = []
    for layer in model.model.layers:
        carry = _Carry()
        for i in range(2):
            attn = layer.self_attn[i]
            view = MLAView(
                attn,
                num_heads=attn.num_attention_heads,
                scale=attn.scale,
                embed_q=attn.embed_q,
                unembed_out=attn.unembed_out,
                q_scale=getattr(attn, "mla_scale_q_lora", None),
                latent_scale=getattr(attn, "mla_scale_kv_lora", None),
            )
            mlp = _ShortcutFirst(layer.mlps[0], layer.mlp, carry) if i == 0 else _ShortcutSecond(layer.mlps[1], carry)
            blocks.append(_Block(view, layer.input_layernorm[i], mlp, layer.post_attention_layernorm[i]))
    model.model.layers = blocks
    return model


_LINEAR_HYBRID = (
    "a hybrid: most of its layers use linear attention (a recurrent state per sequence), which the "
    "engine's paged latent cache does not hold yet"
)
_SPARSE_INDEXER = (
    "its attention selects top-k cached tokens with a learned indexer; the engine attends densely "
    "over the paged latent cache and would silently compute a different model"
)

REFUSED: dict[str, str] = {
    "kimi_linear": _LINEAR_HYBRID,
    "kimi_k3": _LINEAR_HYBRID,
    "bailing_hybrid": _LINEAR_HYBRID,
    "bailing_moe_v3": _LINEAR_HYBRID,
    "deepseek_v32": _SPARSE_INDEXER,
    "glm_moe_dsa": _SPARSE_INDEXER,
    "deepseek_v41": _SPARSE_INDEXER + ", and it compresses its cache and mixes hyper-connections",
    "longcat_flash_ngram": (
        "its n-gram embeddings read each sequence's earlier tokens, which the engine's embedding step does not carry"
    ),
}

REGISTRY: dict[str, Architecture] = {
    a.family: a
    for a in (
        Architecture(
            "mistral4",
            ("mistral4",),
            "Mistral Small 4 (and the embedded demo model)",
            _keep,
            route=_mistral4_route,
            attn_scale=_llama4_attn_scale,
        ),
        Architecture(
            "deepseek_v3",
            ("deepseek_v3", "kimi_k2", "joyai_llm_flash"),
            "DeepSeek-V3 / V3.1 / R1, Kimi K2 (Instruct, Thinking), Moonlight, JoyAI-LLM-Flash",
            _keep,
        ),
        Architecture("glm4_moe_lite", ("glm4_moe_lite",), "GLM-4.7-Flash", _keep),
        Architecture("kimi_k25", ("kimi_k25",), "Kimi K2.5 (text)", _text_model),
        Architecture("kimi_vl", ("kimi_vl",), "Kimi-VL-A3B (text)", _text_model),
        Architecture(
            "deepseek_v2",
            ("deepseek_v2",),
            "DeepSeek-V2, V2-Lite, V2.5, DeepSeek-Coder-V2",
            _adapt_deepseek_v2,
        ),
        Architecture("minicpm3", ("minicpm3",), "MiniCPM3-4B", _adapt_minicpm3),
        Architecture("youtu_llm", ("youtu_llm",), "Youtu-LLM", _adapt_youtu_llm),
        Architecture(
            "longcat_flash",
            ("longcat_flash",),
            "LongCat-Flash-Chat, LongCat-Flash-Thinking",
            _adapt_longcat_flash,
            attentions=_two_attentions,
        ),
    )
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(t for a in REGISTRY.values() for t in a.model_types)


def family_of(model: Any) -> str:
    """The mlx-lm module whose `Model` this is (`mlx_lm.models.<family>`): config types that
    mlx-lm remaps (`kimi_k2` -> `deepseek_v3`) resolve to the module that loaded them."""
    adapted: str | None = getattr(model, _ADAPTED, None)
    if adapted is not None:
        return adapted
    module: str = type(model).__module__
    return module.rsplit(".", 1)[-1] if module.startswith("mlx_lm.models.") else module


def model_type_of(model: Any) -> str:
    args = getattr(model, "args", None) or getattr(model, "config", None)
    name = getattr(args, "model_type", None)
    return name if isinstance(name, str) else family_of(model)


def check_supported(model: Any) -> Architecture:
    """The model's architecture, or UnsupportedArchitecture naming it, why, and what is served."""
    family = family_of(model)
    if family in REGISTRY:
        return REGISTRY[family]
    name = model_type_of(model)
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    reason = REFUSED.get(family) or REFUSED.get(name)
    if reason:
        raise UnsupportedArchitecture(f"architecture {name!r} is not served: {reason}. Supported: {supported}")
    raise UnsupportedArchitecture(
        f"unsupported architecture {name!r}: this server serves multi-head latent attention models of types {supported}"
    )


def adapt_model(model: Any) -> Any:
    """The model the engine runs, adapted in place from the one mlx-lm loaded: once, by the
    factory that assembles the engine (`factory.engine_model`). After this the model is the
    engine's: mlx-lm's own forward pass is no longer meant to run on it."""
    arch = check_supported(model)
    engine_model = arch.adapt(model)
    fuse_experts(engine_model)  # after any sharding: experts.py says why that order holds
    setattr(engine_model, _ADAPTED, arch.family)
    return engine_model
