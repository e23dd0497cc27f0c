"""Verifying drafts on scripted runners whose logits are known: the output's distribution is the
model's at temperature 1.0 (a chi-square test), and no block holding a rejected drafted token is
ever published to the prefix cache."""

from __future__ import annotations

import itertools

import mlx.core as mx
from support.engine_harness import ScriptedRunner, make_engine, prompt, run_until_idle, submit

A = [20, 21, 22, 23]  # the tokens the Markov runner's model writes
# Row i: the next token's distribution after A[i] (after any other token: row 0).
P = [
    [0.40, 0.30, 0.15, 0.15],
    [0.15, 0.15, 0.30, 0.40],
    [0.25, 0.25, 0.25, 0.25],
    [0.55, 0.15, 0.15, 0.15],
]


class MarkovRunner(ScriptedRunner):
    """A model whose next token depends on the token before it only (`P`): each sampled row's
    logits are log P of its position's input, the sequence's newest token or a drafted one."""

    def run(self, plan) -> mx.array:
        log_p = mx.full((len(A), self.vocab_size), -mx.inf)
        log_p[:, A[0] : A[-1] + 1] = mx.log(mx.array(P))
        inputs = []
        for seq, k in plan.samples:
            inputs += [seq.token_ids[-1], *seq.draft][-k:]
        return log_p[mx.array([A.index(t) if t in A else 0 for t in inputs])]


class Fixed:
    """A drafter that always guesses the same tokens."""

    name = "fixed"

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        return self.tokens[:k]


N = 3000
LENGTH = 3  # the tokens tested (each request draws twice as many: drafts after rollbacks)
# The 0.999 quantile of chi-square with 4**3 - 1 = 63 degrees of freedom (Wilson-Hilferty: 103.5).
CRITICAL = 103.5


def outputs(speculative: str) -> tuple[list[tuple[int, ...]], dict]:
    engine = make_engine(
        num_blocks=256,
        runner=MarkovRunner(),
        speculative=speculative,
        num_speculative_tokens=2,
        speculative_max_batch=256,
        max_num_seqs=256,
        async_scheduling="off",
    )
    if speculative != "off":
        engine.speculator.drafter = Fixed([21, 23])  # likely, then unlikely after 21: both outcomes often
    outs = [
        submit(engine, f"s{i}", [5, 6, 7], temperature=1.0, seed=i, max_tokens=2 * LENGTH, ignore_eos=True)
        for i in range(N)
    ]
    run_until_idle(engine)
    return [tuple(o.token_ids) for o in outs], engine.stats()


def chi_square(samples: list[tuple[int, ...]]) -> float:
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s[:LENGTH]] = counts.get(s[:LENGTH], 0) + 1
    stat = 0.0
    for path in itertools.product(range(len(A)), repeat=LENGTH):
        p, prev = 1.0, 0
        for i in path:
            p, prev = p * P[prev][i], i
        expected = N * p
        stat += (counts.get(tuple(A[i] for i in path), 0) - expected) ** 2 / expected
    return stat


def test_speculative_outputs_have_the_models_distribution_at_temperature_one():
    """The joint distribution of the first three tokens (64 cells, the smallest expecting 10 of
    the 3000 samples) against the model's exact one, with and without speculation; the level is
    0.001. Power (simulated, 2000 runs of the test): 1.0 against keeping the draft on a
    disagreement, 1.0 against resampling from p instead of the residual on a rejection (the drafted 21
    would follow 20 0.51 of the time instead of 0.30), and 0.93 (0.69) against any alternative q
    with N * sum((q - p)^2 / p) = 70 (50) (noncentral chi-square, 63 degrees of freedom); its
    size, simulated, 0.0015."""
    plain, plain_stats = outputs("off")
    assert plain_stats["spec_drafts"] == 0
    speculative, stats = outputs("ngram")
    assert stats["spec_drafts"] > N and 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    assert chi_square(plain) < CRITICAL
    assert chi_square(speculative) < CRITICAL
    # Each token's draw is keyed by the request's seed and the token's index, so the very same.
    assert speculative == plain


class Recording(ScriptedRunner):
    """Cache blocks of 4 tokens; records which token each step writes to each cache slot and
    checks, before every step, that each published block holds the tokens it is published for
    and that no step writes into one."""

    block_size = 4

    def __init__(self, script):
        super().__init__(script)
        self.written: dict[int, int] = {}
        self.blocks = None  # the engine's BlockManager

    def check_published(self) -> set[int]:
        """Assert every published block holds the tokens it is published for; their ids."""
        bs = self.block_size
        published = {b.id: b.token_ids for b in self.blocks.blocks if b.hash is not None}
        for bid, ids in published.items():
            assert tuple(self.written.get(bid * bs + i) for i in range(bs)) == ids, f"block {bid}"
        return set(published)

    def run(self, plan) -> mx.array:
        bs = self.block_size
        published = self.check_published()
        for seq, n in plan.decodes + plan.prefills:
            start = seq.num_computed
            ids = [seq.token_ids[-1], *seq.draft] if seq.draft else seq.token_ids[start : start + n]
            for p, t in zip(range(start, start + n), ids, strict=True):
                bid = seq.block_table[p // bs]
                assert bid not in published, f"a step writes into published block {bid}"
                self.written[bid * bs + p % bs] = t
        return super().run(plan)


class RightThenWrong:
    """Drafts 0, 1 or 2 of the scripted next tokens (by the sequence's length), then a wrong one:
    rollbacks of every length a draft allows, ending at every offset of a block."""

    name = "right-then-wrong"

    def __init__(self, script: list[int], prompt_len: int):
        self.script = script
        self.prompt_len = prompt_len

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        at = len(token_ids) - self.prompt_len
        right = len(token_ids) % 3
        return [*self.script[at : at + right], 7][:k]


def test_rolled_back_positions_never_reach_the_prefix_cache():
    script = [30 + i % 11 for i in range(40)]
    runner = Recording({"g": script})
    engine = make_engine(num_blocks=32, runner=runner, max_model_len=128, speculative="ngram", async_scheduling="off")
    runner.blocks = engine.blocks
    ids = list(range(40, 50))
    engine.speculator.drafter = RightThenWrong(script, len(ids))
    out = submit(engine, "g", ids, max_tokens=len(script), ignore_eos=True)
    while engine.has_work:
        engine.step()
        for seq in engine.scheduler.running:  # a rollback gives back the blocks past what is computed
            assert len(seq.block_table) == -(-seq.num_computed // 4)
    assert out.token_ids == script
    stats = engine.stats()
    assert stats["spec_drafts"] > 10 and 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    # The whole sequence's full blocks are published (as it let them go), every one checked.
    assert len(engine.blocks.cached) == (len(ids) + len(script) - 1) // 4
    runner.check_published()


def test_no_sequence_drafts_while_more_than_speculative_max_batch_run():
    def drafts(requests: int) -> int:
        engine = make_engine(runner=ScriptedRunner(), speculative="ngram", speculative_max_batch=2)
        engine.speculator.drafter = Fixed([100])
        for i in range(requests):
            submit(engine, f"r{i}", prompt(10, seed=i), max_tokens=6, ignore_eos=True)
        run_until_idle(engine)
        return int(engine.stats()["spec_drafts"])

    assert drafts(2) > 0
    assert drafts(3) == 0
