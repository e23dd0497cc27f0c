"""Runs one scheduled step through the model: flat token batch in, logits of sampled rows out.

The model's modules and weights are mlx-lm's (`mistral4`, `deepseek_v3`), adapted for the engine
(`architectures.adapt_model`, which the factory runs); only the attention is ours
(`mla_attention`), over one `LatentCache` per layer, decoding through the backend the runner is
given (`check_decode` is the start-up check the factory chooses it by). What differs by model type
(how a MoE layer routes, a query scale by position) the runner asks of the model's `Architecture`
(architectures.py), never of its classes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from ...kernels.cpu_streams import num_cpu_streams, run_parts
from ...kernels.dense_cache import DenseLatentCache, dense_bytes_per_token
from ...kernels.latent_cache import LatentCache, latent_bytes_per_token
from ...kernels.selfcheck import Verdict, check_fused_decode
from ...platform import current_platform
from ..args import EngineArgs
from ..core.scheduler import StepPlan
from ..core.sequence import Sequence
from .architectures import Route, check_supported
from .experts import by_expert, pays_one_at_a_time, run_by_expert
from .mla_attention import (
    AttentionBatch,
    PrefillChunk,
    cudnn_prefill,
    mla_attention,
    sdpa_layout,
)

LATENT_GROUP_SIZE = 64  # MLX affine 4-bit quantization of the latent, in groups of 64


def cache_dtype(model: Any) -> mx.Dtype:
    """The cache's dtype: the model's activations' (its embeddings may be quantized)."""
    dtype: mx.Dtype = model.model.norm.weight.dtype
    return dtype


def cache_bytes_per_token(model: Any, latent_cache: str = "int4") -> int:
    """Latent cache bytes one token takes over all of the model's layers (`latent_cache`: "int4" or "bf16")."""
    args = model.args
    per_layer = latent_bytes_per_token(args.kv_lora_rank, args.qk_rope_head_dim, LATENT_GROUP_SIZE, cache_dtype(model))
    if latent_cache == "bf16":
        per_layer = dense_bytes_per_token(args.kv_lora_rank, args.qk_rope_head_dim)
    return len(model.model.layers) * per_layer


def check_decode(model: Any, args: EngineArgs) -> Verdict:
    """The start-up self-check (kernels/selfcheck.py) on this adapted model's decode shapes, for
    `args.decode_backend`; the verdict names the backend a runner of the model decodes through."""
    return check_fused_decode(
        R=model.args.kv_lora_rank,
        P=model.args.qk_rope_head_dim,
        H=model.model.layers[0].self_attn.num_heads,
        dtype=cache_dtype(model),
        group_size=LATENT_GROUP_SIZE,
        block_size=args.block_size,
        forced=None if args.decode_backend == "auto" else args.decode_backend,
    )


Mark = Callable[..., None]  # mark(name, *arrays): a profiler evaluates and times there

# Fewest tokens worth a CPU stream of their own in the MLP (see ModelRunner._mlp).
MLP_PART_MIN_TOKENS = 32


def _mlp(mlp: Any, x: mx.array, mark: Mark | None, moe_by_expert: str, route: Route) -> mx.array:
    """The layer's MLP over [T, D]; with `mark`, the MoE's router (the architecture's `route`),
    routed experts and shared experts are split apart (as mlx-lm computes them) so a profiler can
    time each."""
    one_at_a_time = by_expert(mlp, x.shape[0], moe_by_expert)
    if (mark is None and not one_at_a_time) or not hasattr(mlp, "switch_mlp"):
        y: mx.array = mlp(x[None])[0]
        if mark:
            mark("dense_mlp", y)
        return y
    inds, scores = route(mlp, x)
    if mark:
        mark("router", inds)
    chosen = np.asarray(inds) if one_at_a_time else None  # waits for the router
    if chosen is not None and pays_one_at_a_time(chosen, moe_by_expert):
        y = run_by_expert(mlp.switch_mlp, x, chosen)
    else:
        y = mlp.switch_mlp(x, inds)
    y = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
    if mark:
        mark("experts", y)
    if getattr(mlp, "shared_experts", None) is not None:
        y = y + mlp.shared_experts(x)
        if mark:
            mark("shared_expert", y)
    if getattr(mlp, "sharding_group", None) is not None:  # tensor parallel: what mlx-lm's MoE ends with
        y = mx.distributed.all_sum(y, group=mlp.sharding_group)
    return y


class ModelRunner:
    def __init__(
        self,
        model: Any,
        num_blocks: int,
        decode_backend: str,
        block_size: int = 64,
        latent_cache: str = "int4",
        moe_by_expert: str = "auto",
        prefill_buckets: str = "auto",
        sharded: bool = False,
    ) -> None:
        """`model`: adapted (`architectures.adapt_model`). `decode_backend`: what its decode
        attention runs through (`mla_decode.BACKENDS`). `sharded`: the model is split across
        tensor-parallel ranks, so its layers all-reduce."""
        args = model.args
        self.model = model
        self.decode_backend = decode_backend
        self.architecture = check_supported(model)
        self.moe_by_expert = moe_by_expert
        platform = current_platform()
        # On the CPU the MLP runs its tokens in parts on several CPU streams (cores); not when the
        # layers all-reduce: each rank must issue its collectives in one order.
        self.mlp_parts = num_cpu_streams() if platform.backend == "cpu" and not sharded else 1
        self.inner = model.model
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size: int = args.vocab_size
        self.dtype = cache_dtype(model)
        qk_dim = args.qk_nope_head_dim + args.qk_rope_head_dim
        self.prefill_buckets = prefill_buckets == "on" or (
            prefill_buckets == "auto"
            and platform.defaults.prefill_buckets
            and cudnn_prefill(qk_dim, args.v_head_dim, self.dtype)
        )
        self.attn_scale = self.architecture.attn_scale(args)
        self.caches: list[LatentCache | DenseLatentCache] = [
            DenseLatentCache(num_blocks, block_size, args.kv_lora_rank, args.qk_rope_head_dim)
            if latent_cache == "bf16"
            else LatentCache(
                num_blocks, block_size, args.kv_lora_rank, args.qk_rope_head_dim, LATENT_GROUP_SIZE, self.dtype
            )
            for _ in self.inner.layers
        ]
        mx.eval(*[a for c in self.caches for a in c.arrays()])

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def run(self, plan: StepPlan) -> mx.array:
        """Logits [N, V] (float32) of every position the step samples, in `plan.samples` order:
        every position of each decode, then the last of each prefill chunk that reaches the end of
        its sequence."""
        return self.forward(*self.prepare(plan))

    def prepare(self, plan: StepPlan) -> tuple[mx.array, AttentionBatch, mx.array]:
        """The step's inputs: token ids [T], the attention batch, and the rows that sample.

        One-position decodes go first, through the decode kernel; a decode that verifies a draft
        (its newest token and the drafted ones) runs as a short prefill chunk over its cached
        prefix, after them and before the prefill chunks."""
        tokens: list[int] = []
        positions: list[int] = []
        ends: dict[Sequence, int] = {}  # where each sequence's positions end in the flat batch
        singles = [seq for seq, n in plan.decodes if n == 1]
        drawn_rows: list[int] = []
        on_device: list[int] = []
        drawn = None  # decode inputs still on the device (`Sequence.pending`)
        for seq in singles:
            if seq.pending is not None:
                drawn, row = seq.pending  # the previous step's draws: one array for all
                drawn_rows.append(row)
                on_device.append(len(tokens))
            tokens.append(seq.token_ids[-1] if seq.pending is None else 0)
            positions.append(seq.num_computed)
            ends[seq] = len(tokens)
        chunks = []
        for seq, n in [(s, n) for s, n in plan.decodes if n > 1] + plan.prefills:
            start = seq.num_computed
            if seq.draft:
                assert seq.pending is None and n == 1 + len(seq.draft), "a draft follows a token read back"
                tokens.extend([seq.token_ids[-1], *seq.draft])
            else:
                tokens.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            nb = -(-(start + n) // self.block_size)
            table = mx.array(seq.block_table[:nb], mx.int32)
            layout = sdpa_layout(n, start + n) if self.prefill_buckets else None
            chunks.append(PrefillChunk(start, n, table, self._slots(seq, start, n), layout))
            ends[seq] = len(tokens)
        # A sequence samples the last positions it runs, in `plan.samples` order.
        rows = [r for seq, k in plan.samples for r in range(ends[seq] - k, ends[seq])]

        batch = AttentionBatch(
            positions=mx.array(positions, mx.int32),
            num_decodes=len(singles),
            block_table=self._block_table(singles) if singles else None,
            context_lens=mx.array([s.num_computed for s in singles], mx.int32) if singles else None,
            prefills=chunks,
            attn_scale=None,
        )
        if self.attn_scale is not None:
            batch.attn_scale = self.attn_scale(batch.positions)
        ids = mx.array(tokens, mx.int32)
        if drawn is not None:
            ids[mx.array(on_device, mx.int32)] = drawn[mx.array(drawn_rows, mx.int32)]
        return ids, batch, mx.array(rows, mx.int32)

    def forward(self, tokens: mx.array, batch: AttentionBatch, rows: mx.array, mark: Mark | None = None) -> mx.array:
        """The model over one step's tokens. `mark(name, *arrays)`, if given, is called after each
        part (a profiler evaluates and times there: see server/bench/profile.py)."""
        h = self.inner.embed_tokens(tokens)
        for layer, cache in zip(self.inner.layers, self.caches, strict=False):
            a = mla_attention(layer.self_attn, layer.input_layernorm(h), cache, batch, self.decode_backend, mark)
            h = h + a
            h = h + self._mlp(layer.mlp, layer.post_attention_layernorm(h), mark)
        h = self.inner.norm(h[rows])
        logits = self.model.lm_head(h) if hasattr(self.model, "lm_head") else self.inner.embed_tokens.as_linear(h)
        out: mx.array = logits.astype(mx.float32)
        if mark:
            mark("lm_head", out)
        return out

    def _mlp(self, mlp: Any, x: mx.array, mark: Mark | None) -> mx.array:
        """`_mlp` over [T, D]; on the CPU, in parts of at least MLP_PART_MIN_TOKENS tokens (each
        token's MLP is its own), one per CPU stream (`cpu_streams`), unless the MLP says its tokens
        must go in one call (`tokens_in_parts = False`)."""
        T = x.shape[0]
        n = min(self.mlp_parts, T // MLP_PART_MIN_TOKENS)
        route = self.architecture.route
        if n < 2 or not getattr(mlp, "tokens_in_parts", True):
            return _mlp(mlp, x, mark, self.moe_by_expert, route)
        bounds = [T * i // n for i in range(n + 1)]

        def part(a: int, b: int) -> Callable[[], mx.array]:
            return lambda: _mlp(mlp, x[a:b], mark, self.moe_by_expert, route)

        return mx.concatenate(run_parts([part(a, b) for a, b in itertools.pairwise(bounds)]))

    def cache_arrays(self) -> list[mx.array]:
        return [a for c in self.caches for a in c.arrays()]

    @property
    def block_nbytes(self) -> int:
        """Bytes one block takes over every layer: a row of `export_blocks`."""
        return self.cache_bytes // self.num_blocks

    def export_blocks(self, block_ids: list[int]) -> mx.array:
        """The bytes of pool blocks `block_ids` (lazy: built after a step, evaluated with it),
        uint8 [len(block_ids), block_nbytes]: every layer's fields in `cache_arrays` order."""
        ids = mx.array(block_ids, mx.int32)
        rows = [a[ids].view(mx.uint8).reshape(len(block_ids), -1) for a in self.cache_arrays()]
        return mx.concatenate(rows, axis=1)

    def import_blocks(self, block_ids: list[int], data: np.ndarray) -> None:
        """Set pool blocks `block_ids` to `data`, rows as `export_blocks` gives them (lazy: the
        next step evaluates the writes; a decode kernel of that step runs after them, as after a
        prefill's, and reads none of these blocks: mla_decode.py's invariants 2 and 3)."""
        ids = mx.array(block_ids, mx.int32)
        col = 0
        for a in self.cache_arrays():
            width = a.shape[1] * a.shape[2] * a.dtype.size
            part = mx.array(data[:, col : col + width]).view(a.dtype)
            a[ids] = part.reshape(len(block_ids), *a.shape[1:])
            col += width

    def _slots(self, seq: Sequence, start: int, n: int) -> mx.array:
        bs = self.block_size
        return mx.array([seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)], mx.int32)

    def _block_table(self, seqs: list[Sequence]) -> mx.array:
        width = max(len(s.block_table) for s in seqs)
        return mx.array([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], mx.int32)
