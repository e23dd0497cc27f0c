"""The chain of logits processors (logits_processors.py): which links a step gets, and their order.

Each order test picks logits where the chain's order and the order with two links swapped draw
different tokens.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from server.engine.sample.logits_processors import logits_processors
from server.engine.sample.sampling import SamplerState, sample
from server.engine.types import SamplingParams

V = 16


def _state(prompt=(), vocab=V, **kw) -> SamplerState:
    return SamplerState(SamplingParams(**kw), list(prompt), vocab)


def _draw(logits, states, constraints=None) -> list[int]:
    res = sample(mx.array(logits), states, logits_processors(states, constraints))
    return res.tokens.tolist()


def _support(logits, n=2000, **kw) -> set[int]:
    """Tokens drawn by n differently seeded rows sharing one row of logits."""
    states = [_state(vocab=len(logits), seed=i, **kw) for i in range(n)]
    return set(_draw(np.tile(np.array(logits, dtype=np.float32), (n, 1)), states))


class FixedMasks:
    """Stands in for `Constraints`: every constrained row gets `row`'s bitmask."""

    def __init__(self, allowed: set[int]):
        self.row = np.zeros((1,), dtype=np.uint32)
        for t in allowed:
            self.row[0] |= np.uint32(1 << t)

    def fill_masks(self, constraints) -> np.ndarray:
        rows = [self.row if c is not None else np.full((1,), 0xFFFFFFFF, np.uint32) for c in constraints]
        return np.stack(rows).view(np.int32)


def test_a_step_gets_only_the_links_its_rows_ask_for():
    assert logits_processors([_state(temperature=0.0), _state(temperature=1.0)]) == []
    assert len(logits_processors([_state(temperature=0.5), _state(logit_bias={1: 2.0})])) == 2
    every = _state(temperature=0.7, logit_bias={1: 1.0}, presence_penalty=0.5, min_p=0.1, top_k=3)
    every.constraint = object()
    assert len(logits_processors([every], FixedMasks({1}))) == 6
    assert len(logits_processors([every])) == 5  # no constraints to fill masks with


def test_bias_comes_before_the_repetition_penalty():
    # Token 0 (in the prompt) at 3.0 with a bias of +1 and a penalty of 2: (3 + 1) / 2 = 2.0
    # loses to token 1's 2.2; penalized first it would be 3 / 2 + 1 = 2.5 and win.
    logits = np.zeros((1, V), dtype=np.float32)
    logits[0, :2] = [3.0, 2.2]
    state = _state(prompt=[0], temperature=0.0, logit_bias={0: 1.0}, repetition_penalty=2.0)
    assert _draw(logits, [state]) == [1]


def test_penalties_come_before_temperature_and_truncation():
    # Token 0 drawn once, frequency penalty 0.3, temperature 0.1, top_k 1: (1.0 - 0.3) / 0.1 = 7
    # loses to 0.8 / 0.1 = 8. After temperature token 0 would keep 10 - 0.3; after top_k it
    # would be the only token left.
    logits = np.zeros((1, V), dtype=np.float32)
    logits[0, :2] = [1.0, 0.8]
    state = _state(temperature=0.1, top_k=1, frequency_penalty=0.3, seed=0)
    state.record(mx.array([0]), 0)
    assert _draw(logits, [state]) == [1]


def test_masks_come_before_truncation_and_no_bias_brings_a_token_back():
    # Token 0 is the best but banned: top_k 1 must keep the best allowed token, not the banned one.
    logits = np.zeros((1, V), dtype=np.float32)
    logits[0, :3] = [5.0, 3.0, 1.0]
    masks = FixedMasks({1, 2})
    for kw in ({"top_k": 1, "temperature": 1.0}, {"temperature": 0.0, "logit_bias": {0: 100.0}}):
        rows = [_state(seed=i, **kw) for i in range(50)]
        for s in rows:
            s.constraint = object()
        assert set(_draw(np.tile(logits, (50, 1)), rows, masks)) == {1}, kw


def test_min_p_cuts_the_tempered_distribution():
    # p = [0.5, 0.3, 0.2]: min_p 0.7 keeps only token 0 at temperature 1; at temperature 2 the
    # probabilities go as sqrt(p), and token 1 (sqrt(0.6) = 0.77 of the best) stays.
    logits = [math.log(p) for p in (0.5, 0.3, 0.2)]
    assert _support(logits, min_p=0.7) == {0}
    assert _support(logits, min_p=0.7, temperature=2.0) == {0, 1}


def test_top_p_counts_the_mass_min_p_left():
    # p = [0.4, 0.3, 0.2, 0.1]; min_p 0.3 drops token 3, leaving [0.44, 0.33, 0.22]: top_p 0.75 is
    # reached by two tokens. Over the untruncated distribution it would take three (0.4 + 0.3 < 0.75).
    logits = [math.log(p) for p in (0.4, 0.3, 0.2, 0.1)]
    assert _support(logits, top_p=0.75) == {0, 1, 2}
    assert _support(logits, top_p=0.75, min_p=0.3) == {0, 1}
