import math

import mlx.core as mx
import numpy as np
import pytest

from server.engine.sample.logits_processors import logits_processors
from server.engine.sample.sampling import SamplerState, sample
from server.engine.types import EngineError, SamplingParams

V = 64


def _state(prompt=(), vocab=V, **kw) -> SamplerState:
    return SamplerState(SamplingParams(**kw), list(prompt), vocab)


def _draw(logits, states) -> list[int]:
    res = sample(mx.array(logits), states, logits_processors(states))
    mx.eval(res.tokens)
    return res.tokens.tolist()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _support(probs, n=3000, **kw) -> set[int]:
    """Tokens drawn by n differently seeded rows sharing one distribution."""
    logits = np.log(np.array(probs, dtype=np.float32))
    states = [_state(vocab=len(probs), temperature=1.0, seed=i, **kw) for i in range(n)]
    return set(_draw(np.tile(logits, (n, 1)), states))


PROBS = [0.5, 0.3, 0.1, 0.05, 0.03, 0.02]


def test_greedy_is_argmax_for_any_dtype():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, V)).astype(np.float32)
    states = [_state(temperature=0.0) for _ in range(8)]
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        x = mx.array(logits).astype(dtype)
        res = sample(x, states, logits_processors(states))
        expected = np.array(x.astype(mx.float32)).argmax(axis=-1)
        assert res.tokens.dtype == mx.int32
        assert res.tokens.tolist() == expected.tolist()


def test_top_k_one_is_greedy_whatever_the_seed_or_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(16, V)).astype(np.float32)
    states = [_state(temperature=1.5, top_k=1, seed=i) for i in range(16)]
    assert _draw(logits, states) == logits.argmax(axis=-1).tolist()


def test_seeded_request_is_independent_of_its_batch():
    rng = np.random.default_rng(2)
    steps = 12
    mine = rng.normal(size=(steps, V)).astype(np.float32)
    params = dict(temperature=0.9, top_p=0.95, seed=1234, presence_penalty=0.2)

    def run(position: int, others: list[dict]) -> list[int]:
        me = _state(**params)
        neighbours = [_state(**kw) for kw in others]
        out = []
        for t in range(steps):
            batch = rng.normal(size=(len(others) + 1, V)).astype(np.float32)
            batch[position] = mine[t]
            states = neighbours[:position] + [me] + neighbours[position:]
            tokens = _draw(batch, states)
            for s, tok in zip(states, tokens, strict=True):
                s.record(mx.array([tok]), 0)
            out.append(tokens[position])
        return out

    alone = run(0, [])
    crowded = [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, seed=1234),  # same seed, different request: must not interfere
        dict(temperature=1.2, top_k=5, repetition_penalty=1.3, logit_bias={3: 5.0}),
        dict(temperature=1.0, min_p=0.1, seed=9),
    ]
    assert run(3, crowded) == alone
    assert run(5, crowded) == alone
    assert run(1, crowded[:2]) == alone
    params["seed"] = 4321
    assert run(0, []) != alone


def test_unseeded_requests_differ():
    logits = np.zeros((2, 1000), dtype=np.float32)
    a, b = _state(vocab=1000), _state(vocab=1000)
    seq_a, seq_b = [], []
    for _ in range(10):
        ta, tb = _draw(logits, [a, b])
        a.record(mx.array([ta]), 0), b.record(mx.array([tb]), 0)
        seq_a.append(ta), seq_b.append(tb)
    assert seq_a != seq_b


def test_temperature_sampling_follows_softmax():
    n = 6000
    logits = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
    for temp in (1.0, 0.5):
        states = [_state(vocab=4, temperature=temp, seed=i) for i in range(n)]
        counts = np.bincount(_draw(np.tile(logits, (n, 1)), states), minlength=4) / n
        expected = np.exp(_log_softmax(logits / temp))
        assert np.abs(counts - expected).max() < 0.025, (temp, counts, expected)


def test_top_p_restricts_support():
    assert _support(PROBS, top_p=0.75) == {0, 1}
    assert _support(PROBS, top_p=0.85) == {0, 1, 2}
    assert _support(PROBS, top_p=1.0) == set(range(6))


def test_min_p_restricts_support():
    assert _support(PROBS, min_p=0.15) == {0, 1, 2}
    assert _support(PROBS, min_p=0.5) == {0, 1}


def test_top_k_restricts_support():
    assert _support(PROBS, top_k=2) == {0, 1}
    assert _support(PROBS, top_k=4) == {0, 1, 2, 3}


def test_truncation_is_per_row_in_a_mixed_batch():
    logits = np.log(np.array(PROBS, dtype=np.float32))
    kinds = [dict(top_k=2), dict(top_p=0.85), dict(min_p=0.5), dict(), dict(top_k=3, top_p=0.75)]
    allowed = [{0, 1}, {0, 1, 2}, {0, 1}, set(range(6)), {0, 1}]
    n = 800
    states = [_state(vocab=6, seed=i, **kinds[i % 5]) for i in range(5 * n)]
    tokens = _draw(np.tile(logits, (5 * n, 1)), states)
    for i, kw in enumerate(kinds):
        seen = set(tokens[i::5])
        assert seen == allowed[i], (kw, seen)


def test_logit_bias():
    logits = np.zeros((3, V), dtype=np.float32)
    logits[:, 7] = 5.0
    states = [
        _state(temperature=0.0, logit_bias={3: 100.0}),
        _state(temperature=0.0, logit_bias={7: -100.0, 9: 1.0}),
        _state(temperature=0.0),
    ]
    assert _draw(logits, states) == [3, 9, 7]
    many = [_state(logit_bias={7: -100.0}) for _ in range(200)]
    assert 7 not in _draw(np.tile(logits[0], (200, 1)), many)


def test_logit_bias_out_of_vocab_is_refused():
    with pytest.raises(EngineError):
        _state(logit_bias={V: 1.0})


def test_repetition_penalty_covers_prompt_and_output():
    logits = np.zeros((1, V), dtype=np.float32)
    logits[0, :3] = [2.0, 1.8, 1.7]
    logits[0, 5] = -1.0
    # Token 0 is in the prompt: 2.0 / 1.5 < 1.8.
    s = _state(prompt=[0, 5], temperature=0.0, repetition_penalty=1.5)
    assert _draw(logits, [s]) == [1]
    s.record(mx.array([1]), 0)  # now 1.8 / 1.5 < 1.7
    assert _draw(logits, [s]) == [2]
    # A negative logit is multiplied by the penalty (-1.0 -> -3.0), not divided.
    neg = np.full((1, V), -2.0, dtype=np.float32)
    neg[0, 5] = -1.0
    neg[0, 6] = -1.5
    assert _draw(neg, [_state(prompt=[5], temperature=0.0, repetition_penalty=3.0)]) == [6]
    assert _draw(neg, [_state(prompt=[5], temperature=0.0)]) == [5]


def test_presence_and_frequency_penalties_count_output_only():
    logits = np.zeros((1, V), dtype=np.float32)
    logits[0, :2] = [1.0, 0.8]

    def pick(records: int, prompt=(), **kw) -> int:
        s = _state(prompt=prompt, temperature=0.0, **kw)
        for _ in range(records):
            s.record(mx.array([0]), 0)
        return _draw(logits, [s])[0]

    assert pick(1, presence_penalty=0.3) == 1
    assert pick(5, presence_penalty=0.1) == 0  # presence does not grow with the count
    assert pick(1, frequency_penalty=0.1) == 0
    assert pick(3, frequency_penalty=0.1) == 1
    assert pick(0, prompt=[0, 0, 0], presence_penalty=1.0, frequency_penalty=1.0) == 0
    assert pick(1, frequency_penalty=-1.0) == 0  # negative values encourage repeats


def test_penalties_apply_only_to_their_rows():
    logits = np.zeros((2, V), dtype=np.float32)
    logits[:, :2] = [1.0, 0.8]
    a = _state(temperature=0.0, presence_penalty=0.5)
    b = _state(temperature=0.0)
    a.record(mx.array([0]), 0), b.record(mx.array([0]), 0)
    assert _draw(logits, [a, b]) == [1, 0]


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, V)).astype(np.float32) * 3
    states = [
        _state(temperature=0.8, logprobs=True, top_logprobs=5, repetition_penalty=1.4, prompt=list(range(10))),
        _state(temperature=0.0, logprobs=True, top_logprobs=2, logit_bias={0: 30.0}),
        _state(temperature=1.0, logprobs=True),
        _state(temperature=1.0, top_k=3, top_p=0.5),
    ]
    res = sample(mx.array(logits), states, logits_processors(states))
    mx.eval(res.tokens, res.logprobs, res.top_ids, res.top_logprobs)
    ref = _log_softmax(logits)
    tokens = res.tokens.tolist()
    assert tokens[1] == 0  # the bias changed the draw, not the reported logprob
    np.testing.assert_allclose(np.array(res.logprobs), ref[np.arange(4), tokens], rtol=1e-5, atol=1e-5)
    assert res.top_ids.shape == (4, 5) and res.top_logprobs.dtype == mx.float32
    order = np.argsort(-ref, axis=-1)[:, :5]
    assert np.array(res.top_ids).tolist() == order.tolist()
    np.testing.assert_allclose(
        np.array(res.top_logprobs), np.take_along_axis(ref, order, axis=-1), rtol=1e-5, atol=1e-5
    )


def test_no_top_logprobs_unless_asked():
    states = [_state(), _state(logprobs=True)]
    res = sample(mx.zeros((2, V)), states, logits_processors(states))
    assert res.top_ids is None and res.top_logprobs is None
    mx.eval(res.logprobs)
    assert np.allclose(np.array(res.logprobs), -math.log(V))


def test_a_request_draws_fresh_noise_every_step():
    """A request's random stream advances with every token it records: over a flat distribution
    its draws differ from step to step (the same noise each step would repeat one token)."""
    logits = np.zeros((1, 1000), dtype=np.float32)
    for state in (_state(vocab=1000, seed=7), _state(vocab=1000)):
        drawn = []
        for _ in range(16):
            (token,) = _draw(logits, [state])
            state.record(mx.array([token]), 0)
            drawn.append(token)
        assert len(set(drawn)) > 8, drawn


def test_several_rows_of_one_sequence_draw_its_next_tokens_in_order():
    """A step that samples three positions of a sequence draws what three steps would (row j
    takes the key of its token step + j), and hands them back together, in row order."""
    flat = np.zeros((1, 1000), dtype=np.float32)
    alone = _state(vocab=1000, seed=5)
    singly = []
    for _ in range(4):
        (token,) = _draw(flat, [alone])
        alone.record(mx.array([token]), 0)
        singly.append(token)
    several, other = _state(vocab=1000, seed=5), _state(vocab=1000, seed=6)
    rows = [several] * 3 + [other]
    res = sample(mx.zeros((4, 1000)), rows, logits_processors(rows), lengths=[3, 1])
    by_sequence = res.read_back(logprobs=False)
    assert [d.token for d in by_sequence[0]] == singly[:3] and len(by_sequence[1]) == 1
    several.record(res.tokens, 0, 3)
    assert _draw(flat, [several]) == singly[3:]
