"""The interface every drafter implements: tokens guessed to follow a sequence."""

from __future__ import annotations

from typing import Protocol


class Drafter(Protocol):
    """Guesses the tokens that follow a sequence, for the model to verify in one step.

    A drafter is deterministic (its draft is a point mass), which is what lets the engine verify
    a draft exactly by sampling each position as usual and keeping the draft up to the first
    token the sample disagrees with (`Speculator.verified`).
    """

    name: str

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """At most `k` tokens guessed to follow `token_ids` (a sequence's prompt and output);
        none when it has no guess."""
        ...
