"""The prompt-lookup drafter: the longest ending that occurred before, at its latest occurrence."""

from __future__ import annotations

from server.engine.spec_decode.ngram import NgramDrafter


def test_drafts_what_followed_the_latest_occurrence_of_the_ending():
    ids = [1, 2, 3, 9, 8, 1, 2, 3, 7, 6, 5, 1, 2, 3]
    assert NgramDrafter(min_n=2, max_n=3).propose(ids, 2) == [7, 6]


def test_the_longest_matching_ending_wins_over_a_later_shorter_one():
    ids = [4, 2, 3, 10, 11, 5, 2, 3, 12, 4, 2, 3]  # "2 3" last came before 12; "4 2 3" before 10
    assert NgramDrafter(min_n=2, max_n=3).propose(ids, 2) == [10, 11]


def test_no_draft_without_an_earlier_occurrence_and_never_past_the_sequence():
    assert NgramDrafter().propose([1, 2, 3, 4, 5], 3) == []
    assert NgramDrafter().propose([5, 6, 7, 5, 6], 3) == [7, 5, 6]
    assert NgramDrafter().propose([5, 6], 3) == []
