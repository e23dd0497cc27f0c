"""The speculator's policy: what a verified draft keeps, the adapted draft length, who drafts,
and the counters /health reports."""

from __future__ import annotations

import mlx.core as mx

from server.engine.core.sequence import Sequence, Status
from server.engine.sample.sampling import SamplerState
from server.engine.spec_decode.speculator import Speculator
from server.engine.types import SamplingParams


def running(**params) -> Sequence:
    """A decoding sequence whose prompt repeats, so prompt lookup always has a draft."""
    p = SamplingParams(max_tokens=20, **params)
    seq = Sequence("s", [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], p, emit=lambda _: None)
    seq.status, seq.num_computed, seq.sampler = Status.RUNNING, len(seq) - 1, SamplerState(p, seq.prompt_ids, 8)
    return seq


def test_a_draft_is_kept_up_to_the_first_disagreeing_draw_which_follows_it():
    spec = Speculator("ngram", num_tokens=4, max_batch=8)
    seq = running()
    assert spec.verified(seq, [3, 4, 1], [3, 4, 9, 2]) == 3
    assert seq.draft_len == 3  # one more than it had accepted
    assert spec.verified(seq, [3, 4, 1], [5, 4, 1, 2]) == 1
    assert seq.draft_len == 1
    assert spec.verified(seq, [3, 4, 1], [3, 4, 1, 2]) == 4
    assert seq.draft_len == 4
    stats = spec.stats()
    assert (stats["spec_drafts"], stats["spec_draft_tokens"], stats["spec_accepted_tokens"]) == (3, 9, 5)
    assert stats["spec_acceptance_rate"] == round(5 / 9, 4)
    assert stats["spec_mean_accepted_length"] == round(1 + 5 / 3, 4)


def test_who_drafts_and_how_many_tokens():
    spec = Speculator("ngram", num_tokens=3, max_batch=8)
    seqs = [running(), running(presence_penalty=0.5), running(), running()]
    seqs[2].num_pending, seqs[2].pending = 1, (mx.array([4]), 0)  # its newest token is still on the device
    seqs[2].num_computed += 1
    for t in ([3, 4, 1, 2] * 5)[:18]:  # two tokens left: a draft of one
        seqs[3].append(t)
    seqs[3].num_computed = len(seqs[3]) - 1
    spec.propose(seqs)
    assert [s.draft for s in seqs] == [[3, 4, 1], [], [], [1]]
    assert Speculator("off", 3, 8).stats()["speculative"] == "off"
