"""Prompt lookup: draft the tokens that followed the latest earlier occurrence of the sequence's
own ending n-gram (its prompt and output are the only source: no weights)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramDrafter:
    """Matches the last `max_n` tokens, then shorter endings down to `min_n`, against every
    earlier position; the longest ending that occurred before wins, at its latest occurrence
    (the nearest text is the likeliest to be repeated, as in an edit of a file just read)."""

    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        tokens = np.asarray(token_ids, dtype=np.int64)
        L = len(tokens)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            # Windows that start before the ending itself and have a token after them.
            windows = sliding_window_view(tokens[: L - 1], n)
            hits = np.flatnonzero((windows == tokens[L - n :]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                draft: list[int] = tokens[start : start + k].tolist()
                return draft
        return []
