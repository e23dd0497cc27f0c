"""Per-request token sampling over one batch of logits: the draw.

Every row carries its own `SamplingParams`, through its sequence's `SamplerState`. `sample` runs
the step's chain of logits processors (logits_processors.py owns every rule that changes the
logits, and their order) and draws a token per row; a step may sample several positions of one
sequence, whose rows are then adjacent, and `SampleResult.read_back` hands each sequence its
tokens in order. Everything returned is lazy; the engine evaluates it once per step.

Randomness is counter-based: a row draws its Gumbel noise from a threefry key derived from its
request's seed and the index of the token it draws (the sequence's step counter, plus the row's
place among the sequence's rows of the step), so a seeded request produces the same tokens
whatever else shares the batch and wherever it sits in it.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx

from ..types import InvalidRequest, SamplingParams

if TYPE_CHECKING:
    from .constraints import TokenConstraint
    from .logits_processors import LogitsProcessor

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
class Draw:
    """One drawn token as read back; with logprobs asked, the log-softmax of the raw logits at it
    and the best alternatives (id, logprob), best first."""

    token: int
    logprob: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SampleResult:
    """One step's draws (lazy arrays): N rows, a sequence's rows adjacent, `lengths[i]` of them
    for its i-th sequence."""

    tokens: mx.array  # int32 [N]
    # float32 [N]: log-softmax of the raw logits at the chosen token, before any processor.
    logprobs: mx.array
    lengths: list[int]
    # [N, K] int32 / float32, best first, K = the largest top_logprobs asked in the batch;
    # None when no row asked. Rows that asked for fewer use only their first entries.
    top_ids: mx.array | None = None
    top_logprobs: mx.array | None = None

    def read_back(self, logprobs: bool) -> list[list[Draw]]:
        """Wait for the draws and split them by sequence, each sequence's in row order.
        `logprobs`: read the logprobs and alternatives too (else those fields stay empty)."""
        tokens: list[int] = self.tokens.tolist()  # type: ignore[assignment]
        values: list[float] = self.logprobs.tolist() if logprobs else [0.0] * len(tokens)  # type: ignore[assignment]
        top: list[list[tuple[int, float]]] = [[] for _ in tokens]
        if logprobs and self.top_ids is not None and self.top_logprobs is not None:
            ids: list[list[int]] = self.top_ids.tolist()  # type: ignore[assignment]
            lps: list[list[float]] = self.top_logprobs.tolist()  # type: ignore[assignment]
            top = [list(zip(i, v, strict=True)) for i, v in zip(ids, lps, strict=True)]
        draws = iter([Draw(t, v, alternatives) for t, v, alternatives in zip(tokens, values, top, strict=True)])
        return [list(itertools.islice(draws, n)) for n in self.lengths]


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
            self.bias_ids = mx.array([int(t) for t in params.logit_bias], dtype=mx.int32)
            self.bias_values = mx.array(list(params.logit_bias.values()), dtype=mx.float32)

        self.has_penalties = (
            params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        )
        # Dense [V] arrays updated one scatter per step, so a step never walks the history.
        self.counts = mx.zeros((vocab_size,), dtype=mx.float32) if self.has_penalties else None
        self.prompt_seen = None
        if params.repetition_penalty != 1.0:
            self.prompt_seen = mx.zeros((vocab_size,), dtype=mx.bool_)
            if prompt_ids:
                self.prompt_seen[mx.array(prompt_ids, dtype=mx.int32)] = True

        # The output's grammar or banned tokens (constraints.py); set by the engine after admission.
        self.constraint: TokenConstraint | None = None

        sampled = not params.greedy
        self.has_min_p = sampled and params.min_p > 0.0
        self.has_sort = sampled and (0 < params.top_k < vocab_size or params.top_p < 1.0)

    def record(self, draws: mx.array, row: int, count: int = 1) -> None:
        """Account for this sequence's `count` draws, rows `row` on of a step's draws (advances its
        RNG stream past them). Lazy: the next step samples with them counted before anyone reads
        their values."""
        self.step += count
        if self.counts is not None:
            self.counts = self.counts.at[draws[row : row + count]].add(1.0)

    def rewind(self, count: int) -> None:
        """Take back the last `count` recorded draws (drafted positions a step rejected), so the
        next draw uses the key of the token it draws. Only the step counter: a penalized sequence,
        the only kind with counts, never drafts (spec_decode/speculator.py)."""
        assert self.counts is None
        self.step -= count

    def step_key(self, offset: int = 0) -> tuple[int, int]:
        """Threefry key (two uint32) of the sequence's token `step + offset`: splitmix64's output
        of that index."""
        z = _mix64((self._key_base + (self.step + offset + 1) * _GOLDEN64) & _MASK64)
        return z >> 32, z & 0xFFFFFFFF


def sample(
    logits: mx.array,
    rows: list[SamplerState],
    processors: list[LogitsProcessor],
    lengths: list[int] | None = None,
) -> SampleResult:
    """Draw one token per row. logits: [N, V] (any float dtype); row i belongs to rows[i].

    processors: the step's chain (`logits_processors`), applied to the raw logits in order;
    greedy rows take the argmax of its output, the others a Gumbel-max draw from it. lengths: how
    many adjacent rows each sequence has (None: one each); a sequence's j-th row draws its token
    `step + j`. logprobs are those of the raw logits.
    """
    lengths = [1] * len(rows) if lengths is None else lengths
    raw = logits.astype(mx.float32)
    vocab = raw.shape[-1]
    lse = mx.logsumexp(raw, axis=-1, keepdims=True)  # [N, 1]

    x = raw
    for process in processors:
        x = process(x)

    greedy = [s.params.greedy for s in rows]
    if all(greedy):
        tokens = mx.argmax(x, axis=-1)
    else:
        offsets = [j for n in lengths for j in range(n)]
        keys = mx.array([s.step_key(j) for s, j in zip(rows, offsets, strict=True)], dtype=mx.uint32)
        noisy = x + _gumbel_rows(vocab)(keys)
        # where(), not a zero noise scale: a Gumbel draw may be -inf, and 0 * -inf is nan.
        tokens = mx.argmax(mx.where(mx.array(greedy)[:, None], x, noisy), axis=-1)
    tokens = tokens.astype(mx.int32)

    chosen = mx.take_along_axis(raw, tokens[:, None], axis=-1) - lse
    result = SampleResult(tokens=tokens, logprobs=chosen[:, 0], lengths=lengths)

    k = min(vocab, max((s.params.top_logprobs for s in rows if s.params.logprobs), default=0))
    if k > 0:
        part = mx.argpartition(-raw, k - 1, axis=-1)[:, :k]
        values = mx.take_along_axis(raw, part, axis=-1)
        order = mx.argsort(-values, axis=-1)
        result.top_ids = mx.take_along_axis(part, order, axis=-1).astype(mx.int32)
        result.top_logprobs = mx.take_along_axis(values, order, axis=-1) - lse
    return result


@functools.lru_cache(maxsize=8)
def _gumbel_rows(vocab: int) -> Callable[[mx.array], mx.array]:
    """keys uint32 [N, 2] -> float32 [N, vocab]; row i depends on keys[i] alone."""
    return mx.vmap(lambda key: mx.random.gumbel((vocab,), key=key))
