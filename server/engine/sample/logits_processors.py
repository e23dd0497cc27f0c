"""Every rule that changes a step's logits before the draw, as one ordered chain of processors.

A processor takes float32 logits [R, V] (one row per sampled position, row i belonging to
`rows[i]`) and returns them changed; `logits_processors` builds a step's chain from its rows'
states, with only the processors some row asks for, each over the whole batch (vectorized: the
rows that asked are picked out by index, never walked in Python). The order, stated here once:

1. logit bias (OpenAI `logit_bias`);
2. penalties: repetition (Hugging Face's, over prompt and output), presence and frequency
   (OpenAI's, over the output);
3. token masks (a grammar or a banned tool-call token: constraints.py), after every processor
   that changes values, so that none can bring back a token a mask leaves out;
4. temperature;
5. min_p, against the tempered distribution;
6. top_k, then top_p over what min_p left.

The chain ends with the logits of the distribution each row draws from (a greedy row: whose
argmax it takes), so `sample` only draws. Unlike mlx-lm, which keeps temperature and the
truncations in its sampler, apart from its logits processors (bias, penalties), they are links
of the chain here: a truncation's cut-off depends on every change before it (a mask must come
first, or top_k could keep only banned tokens), and verifying drafted tokens will need each
position's final distribution, which is the chain's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import mlx.core as mx

if TYPE_CHECKING:
    from .constraints import Constraints
    from .sampling import SamplerState

LogitsProcessor = Callable[[mx.array], mx.array]


def logits_processors(
    rows: list[SamplerState], constraints: Constraints | None = None, forward: mx.array | None = None
) -> list[LogitsProcessor]:
    """The chain of a step whose sampled rows belong to `rows`, in the module's order.

    Grammar masks are filled by `constraints` (the engine's) when some row is constrained;
    `forward`, the step's logits, is queued first, so that the model runs while llguidance fills
    them on the CPU (a step's masks depend only on tokens drawn before it).
    """
    chain: list[LogitsProcessor] = []
    if any(s.has_bias for s in rows):
        chain.append(logit_bias(rows))
    if any(s.has_penalties for s in rows):
        chain.append(penalties(rows))
    if constraints is not None and any(s.constraint is not None for s in rows):
        if forward is not None:
            mx.async_eval(forward)  # type: ignore[no-untyped-call]
        chain.append(token_masks(mx.array(constraints.fill_masks([s.constraint for s in rows]))))
    if any(not s.params.greedy and s.params.temperature != 1.0 for s in rows):
        chain.append(temperature(rows))
    if any(s.has_min_p for s in rows):
        chain.append(min_p(rows))
    if any(s.has_sort for s in rows):
        chain.append(top_k_top_p(rows))
    return chain


def _picked(rows: list[SamplerState], flag: str) -> list[int]:
    return [i for i, s in enumerate(rows) if getattr(s, flag)]


def logit_bias(rows: list[SamplerState]) -> LogitsProcessor:
    """OpenAI logit_bias: add each row's bias to its listed token ids."""
    picked = _picked(rows, "has_bias")
    row_ids = mx.concatenate([mx.full(rows[i].bias_ids.shape, i, dtype=mx.int32) for i in picked])
    col_ids = mx.concatenate([rows[i].bias_ids for i in picked])
    values = mx.concatenate([rows[i].bias_values for i in picked])
    return lambda x: x.at[row_ids, col_ids].add(values)


def penalties(rows: list[SamplerState]) -> LogitsProcessor:
    """Repetition (HF: prompt + output), presence and frequency (OpenAI: output) penalties."""
    picked = _picked(rows, "has_penalties")
    idx = mx.array(picked, dtype=mx.int32)
    # Rows with penalties always have counts (see SamplerState).
    counts = mx.stack([c for i in picked if (c := rows[i].counts) is not None])  # [R, V]
    params = [rows[i].params for i in picked]
    seen = rep = None
    if any(p.repetition_penalty != 1.0 for p in params):
        vocab = rows[picked[0]].vocab_size
        no_prompt = mx.zeros((vocab,), dtype=mx.bool_)
        prompt_seen = mx.stack([no_prompt if (p := rows[i].prompt_seen) is None else p for i in picked])
        seen = mx.logical_or(prompt_seen, counts > 0)
        rep = mx.array([p.repetition_penalty for p in params], dtype=mx.float32)[:, None]
    presence = mx.array([p.presence_penalty for p in params], dtype=mx.float32)[:, None]
    frequency = mx.array([p.frequency_penalty for p in params], dtype=mx.float32)[:, None]

    def apply(x: mx.array) -> mx.array:
        sub = x[idx]  # [R, V]
        if seen is not None and rep is not None:
            sub = mx.where(seen, mx.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - frequency * counts - presence * (counts > 0)
        out = mx.array(x)  # a new handle: setitem must not rewrite the caller's array (raw logits)
        out[idx] = sub
        return out

    return apply


def token_masks(masks: mx.array) -> LogitsProcessor:
    """Each row's bitmask (int32 [R, W], bit t of row i set: token t allowed; from
    `Constraints.fill_masks`) sets the tokens it leaves out to -inf.

    Bits are unpacked by broadcasting (no gather): word w, bit b is token 32 * w + b.
    """

    def apply(x: mx.array) -> mx.array:
        rows, vocab = x.shape
        shifts = mx.arange(32, dtype=mx.int32)
        bits = ((masks[:, :, None] >> shifts) & 1).astype(mx.bool_)  # [R, W, 32]
        if vocab == masks.shape[1] * 32:
            return mx.where(bits, x.reshape(rows, -1, 32), -mx.inf).reshape(rows, vocab)
        return mx.where(bits.reshape(rows, -1)[:, :vocab], x, -mx.inf)

    return apply


def temperature(rows: list[SamplerState]) -> LogitsProcessor:
    """Divide each sampled row by its temperature; a greedy row is left as it is."""
    inv_temp = mx.array([1.0 if s.params.greedy else 1.0 / s.params.temperature for s in rows], dtype=mx.float32)
    return lambda x: x * inv_temp[:, None]


def min_p(rows: list[SamplerState]) -> LogitsProcessor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    log_min_p = mx.array([math.log(s.params.min_p) if s.has_min_p else -math.inf for s in rows], dtype=mx.float32)

    def apply(x: mx.array) -> mx.array:
        floor = mx.max(x, axis=-1) + log_min_p  # [R]
        return mx.where(x < floor[:, None], -mx.inf, x)

    return apply


def top_k_top_p(rows: list[SamplerState]) -> LogitsProcessor:
    """Keep each row's top_k best tokens, then its smallest prefix holding top_p of the mass.

    Only the rows that asked are sorted; ties at a row's cut-off are all kept.
    """
    picked = _picked(rows, "has_sort")
    idx = mx.array(picked, dtype=mx.int32)
    vocab = rows[picked[0]].vocab_size
    top_k = [rows[i].params.top_k for i in picked]
    keep_k = mx.array([k if 0 < k < vocab else vocab for k in top_k], dtype=mx.int32)
    top_p = mx.array([rows[i].params.top_p for i in picked], dtype=mx.float32)

    def apply(x: mx.array) -> mx.array:
        ascending = mx.sort(x[idx], axis=-1)  # [R', V]
        kth = mx.take_along_axis(ascending, (vocab - keep_k)[:, None], axis=-1)  # [R', 1]
        ascending = mx.where(ascending < kth, -mx.inf, ascending)
        probs = mx.softmax(ascending, axis=-1)
        mass_above = mx.cumsum(probs, axis=-1, reverse=True) - probs
        keep_p = mx.sum(mass_above < top_p[:, None], axis=-1).astype(mx.int32)
        # top_p >= 1 keeps everything even when rounding pushes the tail's mass_above to 1.
        keep_p = mx.where(top_p >= 1.0, vocab, mx.maximum(keep_p, 1))
        cut = mx.take_along_axis(ascending, (vocab - keep_p)[:, None], axis=-1)[:, 0]
        floor = mx.full((x.shape[0],), -mx.inf, dtype=mx.float32)
        floor[idx] = mx.maximum(cut, kth[:, 0])
        return mx.where(x < floor[:, None], -mx.inf, x)

    return apply
