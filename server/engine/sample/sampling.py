"""Per-request token sampling over one batch of logits.

Every row carries its own `SamplingParams`. The work is vectorized over the batch: Python only
builds small per-row parameter arrays, and the heavier transforms (penalties, logit bias, top-k /
top-p) run on the sub-batch of rows that asked for them. Everything returned is lazy; the engine
evaluates it once per step.

Randomness is counter-based: row i draws its Gumbel noise from a threefry key derived from its
request's seed and its own step index, so a seeded request produces the same tokens whatever
else shares the batch and wherever it sits in it.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

from ..types import InvalidRequest, SamplingParams

if TYPE_CHECKING:
    from .constraints import TokenConstraint

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15

# Keys of unseeded requests; seeded from OS entropy when the process starts.
_process_rng = random.Random()


def _mix64(z: int) -> int:
    """splitmix64's finalizer: a bijection on 64-bit ints that scatters nearby inputs."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
    return z ^ (z >> 31)


@dataclass
class SampleResult:
    """One step's draws for a batch of B rows (lazy arrays)."""

    tokens: mx.array  # int32 [B]
    # float32 [B]: log-softmax of the raw logits at the chosen token, before any sampling transform.
    logprobs: mx.array
    # [B, K] int32 / float32, best first, K = the largest top_logprobs asked in the batch;
    # None when no row asked. Rows that asked for fewer use only their first entries.
    top_ids: mx.array | None = None
    top_logprobs: mx.array | None = None


class SamplerState:
    """Sampling state of one sequence: its parameters, step counter and token counts.

    Created when the request is admitted; `record` is called with every token drawn for it.
    """

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int):
        self.params = params
        self.vocab_size = vocab_size
        self.step = 0
        self._key_base = _mix64(params.seed & _MASK64) if params.seed is not None else _process_rng.getrandbits(64)

        bad = [t for t in params.logit_bias if not 0 <= int(t) < vocab_size]
        if bad:
            raise InvalidRequest(f"logit_bias token ids out of range [0, {vocab_size}): {bad[:5]}")
        self.has_bias = bool(params.logit_bias)
        if self.has_bias:
            self._bias_ids = mx.array([int(t) for t in params.logit_bias], dtype=mx.int32)
            self._bias_values = mx.array(list(params.logit_bias.values()), dtype=mx.float32)

        self.has_penalties = (
            params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        )
        # Dense [V] arrays updated one scatter per token, so a step never walks the history.
        self._counts = mx.zeros((vocab_size,), dtype=mx.float32) if self.has_penalties else None
        self._prompt_seen = None
        if params.repetition_penalty != 1.0:
            self._prompt_seen = mx.zeros((vocab_size,), dtype=mx.bool_)
            if prompt_ids:
                self._prompt_seen[mx.array(prompt_ids, dtype=mx.int32)] = True

        # The output's grammar or banned tokens (constraints.py); set by the engine after admission.
        self.constraint: TokenConstraint | None = None

        sampled = not params.greedy
        self.has_min_p = sampled and params.min_p > 0.0
        self.has_sort = sampled and (0 < params.top_k < vocab_size or params.top_p < 1.0)

    def record(self, draws: mx.array, row: int) -> None:
        """Account for this sequence's draw, row `row` of a step's draws (advances its RNG
        stream). Lazy: the next step samples with it counted before anyone reads its value."""
        self.step += 1
        if self._counts is not None:
            self._counts = self._counts.at[draws[row]].add(1.0)

    def step_key(self) -> tuple[int, int]:
        """Threefry key (two uint32) of the current step: splitmix64's `step`-th output."""
        z = _mix64((self._key_base + (self.step + 1) * _GOLDEN64) & _MASK64)
        return z >> 32, z & 0xFFFFFFFF


def sample(logits: mx.array, states: list[SamplerState], masks: mx.array | None = None) -> SampleResult:
    """Draw one token per row. logits: [B, V] (any float dtype); row i belongs to states[i].

    masks: int32 [B, ceil(V / 32)] bitmask of the tokens each row may draw (bit t of row i set:
    token t allowed), from `Constraints.fill_masks`; None: every token. It applies after bias and
    penalties, before temperature and truncation; logprobs stay those of the raw logits.
    """
    raw = logits.astype(mx.float32)
    vocab = raw.shape[-1]
    lse = mx.logsumexp(raw, axis=-1, keepdims=True)  # [B, 1]

    x = raw
    if any(s.has_bias for s in states):
        x = _apply_bias(x, states)
    if any(s.has_penalties for s in states):
        x = _apply_penalties(x, states)
    if masks is not None:
        x = apply_token_masks(x, masks)

    greedy = [s.params.greedy for s in states]
    if all(greedy):
        tokens = mx.argmax(x, axis=-1)
    else:
        inv_temp = mx.array(
            [1.0 if g else 1.0 / s.params.temperature for g, s in zip(greedy, states, strict=False)],
            dtype=mx.float32,
        )
        scaled = x * inv_temp[:, None]
        if any(s.has_min_p for s in states):
            scaled = _apply_min_p(scaled, states)
        if any(s.has_sort for s in states):
            scaled = _apply_top_k_top_p(scaled, states)
        keys = mx.array([s.step_key() for s in states], dtype=mx.uint32)
        noisy = scaled + _gumbel_rows(vocab)(keys)
        # where(), not a zero noise scale: a Gumbel draw may be -inf, and 0 * -inf is nan.
        tokens = mx.argmax(mx.where(mx.array(greedy)[:, None], x, noisy), axis=-1)
    tokens = tokens.astype(mx.int32)

    chosen = mx.take_along_axis(raw, tokens[:, None], axis=-1) - lse
    result = SampleResult(tokens=tokens, logprobs=chosen[:, 0])

    k = min(vocab, max((s.params.top_logprobs for s in states if s.params.logprobs), default=0))
    if k > 0:
        part = mx.argpartition(-raw, k - 1, axis=-1)[:, :k]
        values = mx.take_along_axis(raw, part, axis=-1)
        order = mx.argsort(-values, axis=-1)
        result.top_ids = mx.take_along_axis(part, order, axis=-1).astype(mx.int32)
        result.top_logprobs = mx.take_along_axis(values, order, axis=-1) - lse
    return result


@functools.lru_cache(maxsize=8)
def _gumbel_rows(vocab: int) -> Callable[[mx.array], mx.array]:
    """keys uint32 [B, 2] -> float32 [B, vocab]; row i depends on keys[i] alone."""
    return mx.vmap(lambda key: mx.random.gumbel((vocab,), key=key))


def apply_token_masks(x: mx.array, masks: mx.array) -> mx.array:
    """x [B, V] with the tokens each row's bitmask (int32 [B, W]) leaves out set to -inf.

    Bits are unpacked by broadcasting (no gather): word w, bit b is token 32 * w + b.
    """
    rows, vocab = x.shape
    shifts = mx.arange(32, dtype=mx.int32)
    bits = ((masks[:, :, None] >> shifts) & 1).astype(mx.bool_)  # [B, W, 32]
    if vocab == masks.shape[1] * 32:
        return mx.where(bits, x.reshape(rows, -1, 32), -mx.inf).reshape(rows, vocab)
    return mx.where(bits.reshape(rows, -1)[:, :vocab], x, -mx.inf)


def _rows(states: list[SamplerState], flag: str) -> list[int]:
    return [i for i, s in enumerate(states) if getattr(s, flag)]


def _apply_bias(x: mx.array, states: list[SamplerState]) -> mx.array:
    """OpenAI logit_bias: add each row's bias to its listed token ids. x: [B, V]."""
    rows = _rows(states, "has_bias")
    row_ids = mx.concatenate([mx.full(states[i]._bias_ids.shape, i, dtype=mx.int32) for i in rows])
    col_ids = mx.concatenate([states[i]._bias_ids for i in rows])
    values = mx.concatenate([states[i]._bias_values for i in rows])
    return x.at[row_ids, col_ids].add(values)


def _apply_penalties(x: mx.array, states: list[SamplerState]) -> mx.array:
    """Repetition (HF: prompt + output), presence and frequency (OpenAI: output) penalties."""
    rows = _rows(states, "has_penalties")
    idx = mx.array(rows, dtype=mx.int32)
    sub = x[idx]  # [R, V]
    # Rows with penalties always have counts (see SamplerState).
    counts = mx.stack([c for i in rows if (c := states[i]._counts) is not None])  # [R, V]
    params = [states[i].params for i in rows]

    if any(p.repetition_penalty != 1.0 for p in params):
        no_prompt = mx.zeros((x.shape[-1],), dtype=mx.bool_)
        prompt_seen = mx.stack([no_prompt if (p := states[i]._prompt_seen) is None else p for i in rows])
        seen = mx.logical_or(prompt_seen, counts > 0)
        rep = mx.array([p.repetition_penalty for p in params], dtype=mx.float32)[:, None]
        penalized = mx.where(sub > 0, sub / rep, sub * rep)
        sub = mx.where(seen, penalized, sub)

    presence = mx.array([p.presence_penalty for p in params], dtype=mx.float32)[:, None]
    frequency = mx.array([p.frequency_penalty for p in params], dtype=mx.float32)[:, None]
    sub = sub - frequency * counts - presence * (counts > 0)

    out = mx.array(x)  # a new handle: setitem must not rewrite the caller's array (raw logits)
    out[idx] = sub
    return out


def _apply_min_p(x: mx.array, states: list[SamplerState]) -> mx.array:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    log_min_p = mx.array(
        [math.log(s.params.min_p) if s.has_min_p else -math.inf for s in states],
        dtype=mx.float32,
    )
    floor = mx.max(x, axis=-1) + log_min_p  # [B]
    return mx.where(x < floor[:, None], -mx.inf, x)


def _apply_top_k_top_p(x: mx.array, states: list[SamplerState]) -> mx.array:
    """Keep each row's top_k best tokens, then its smallest prefix holding top_p of the mass.

    Only the rows that asked are sorted; ties at a row's cut-off are all kept.
    """
    rows = _rows(states, "has_sort")
    vocab = x.shape[-1]
    idx = mx.array(rows, dtype=mx.int32)
    ascending = mx.sort(x[idx], axis=-1)  # [R, V]

    top_k = [states[i].params.top_k for i in rows]
    keep_k = mx.array([k if 0 < k < vocab else vocab for k in top_k], dtype=mx.int32)
    kth = mx.take_along_axis(ascending, (vocab - keep_k)[:, None], axis=-1)  # [R, 1]
    ascending = mx.where(ascending < kth, -mx.inf, ascending)

    top_p = mx.array([states[i].params.top_p for i in rows], dtype=mx.float32)
    probs = mx.softmax(ascending, axis=-1)
    mass_above = mx.cumsum(probs, axis=-1, reverse=True) - probs
    keep_p = mx.sum(mass_above < top_p[:, None], axis=-1).astype(mx.int32)
    # top_p >= 1 keeps everything even when rounding pushes the tail's mass_above to 1.
    keep_p = mx.where(top_p >= 1.0, vocab, mx.maximum(keep_p, 1))
    cut = mx.take_along_axis(ascending, (vocab - keep_p)[:, None], axis=-1)[:, 0]

    floor = mx.full((x.shape[0],), -mx.inf, dtype=mx.float32)
    floor[idx] = mx.maximum(cut, kth[:, 0])
    return mx.where(x < floor[:, None], -mx.inf, x)
