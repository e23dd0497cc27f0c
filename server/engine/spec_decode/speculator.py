"""Which running sequences draft in a step and how many tokens, what a verified draft keeps, and
the speculation counters.

A sequence with a draft of k tokens decodes k + 1 positions in the step (its newest token, then
the draft), each sampled as a decode position always is (the chain of logits processors, the
sequence's seed and token index), in the same forward pass as every other sequence of the batch.
Position j's sample is the token that follows the sequence's first j draft tokens; the draft is
kept up to the first token its sample disagrees with, and that sample (or, all kept, the last
position's) is the next token. For a deterministic drafter this is Leviathan et al.'s rejection
sampling exactly: the draft token t is kept with probability p(t), and a disagreeing sample is a
draw from p with t removed, renormalised, the residual max(0, p - q) of a point-mass q. So the
output has the distribution of decoding without speculation, and with a seed or greedy decoding
the very same tokens.

Not drafted for (they decode one token, in the same step):
- a sequence whose newest token is still on the device (the engine reads a step back before
  building the next while any sequence may draft, see `LLMEngine.step`);
- penalized sampling: the penalties count the output drawn before the step, not the draft;
- constrained output: its grammar mask would have to follow each draft token and roll back.

Each sequence drafts at most one more token than it last had accepted (from 1 to
`num_speculative_tokens`), so a sequence whose drafts miss costs little; and no sequence drafts
while more than `speculative_max_batch` run: a large batch is compute-bound, where verifying
drafts costs what it saves.
"""

from __future__ import annotations

from ..core.sequence import Sequence, Status
from .drafter import Drafter
from .ngram import NgramDrafter

DRAFTERS = {"ngram": NgramDrafter}


class Speculator:
    def __init__(self, method: str, num_tokens: int, max_batch: int) -> None:
        """`method`: "off" or a name in DRAFTERS."""
        self.drafter: Drafter | None = None if method == "off" else DRAFTERS[method]()
        self.num_tokens = num_tokens
        self.max_batch = max_batch
        self.counters = {"spec_drafts": 0, "spec_draft_tokens": 0, "spec_accepted_tokens": 0}

    def active(self, batch: int) -> bool:
        """Whether sequences draft in a step that runs `batch` sequences."""
        return self.drafter is not None and batch <= self.max_batch

    def propose(self, running: list[Sequence]) -> None:
        """Set the draft of every running sequence for the next step (none where it doesn't draft)."""
        active = self.active(len(running))
        for seq in running:
            seq.draft = self._draft(seq) if active else []

    def _draft(self, seq: Sequence) -> list[int]:
        sampler = seq.sampler
        if (
            seq.status is not Status.RUNNING
            or seq.num_remaining != 1
            or seq.pending is not None
            or sampler is None
            or sampler.has_penalties
            or sampler.constraint is not None
        ):
            return []
        assert self.drafter is not None and seq.params.max_tokens is not None  # active; set by add()
        # Every draw stays within max_tokens, so the positions stay within the context.
        k = min(seq.draft_len or self.num_tokens, seq.params.max_tokens - len(seq.output_ids) - 1)
        return self.drafter.propose(seq.token_ids, k) if k > 0 else []

    def verified(self, seq: Sequence, draft: list[int], tokens: list[int]) -> int:
        """How many of a step's `tokens` (the draws of its k + 1 positions) `seq` keeps for its
        `draft`: the draft tokens up to the first the draws disagree with, and that draw."""
        accepted = 0
        while accepted < len(draft) and tokens[accepted] == draft[accepted]:
            accepted += 1
        self.counters["spec_drafts"] += 1
        self.counters["spec_draft_tokens"] += len(draft)
        self.counters["spec_accepted_tokens"] += accepted
        seq.draft_len = min(self.num_tokens, accepted + 1)
        return accepted + 1

    def stats(self) -> dict[str, object]:
        """The counters, the acceptance rate (accepted / drafted tokens) and the mean accepted
        length (tokens a verified draft yields, vLLM's: 1 + accepted tokens per draft)."""
        c = self.counters
        return {
            "speculative": self.drafter.name if self.drafter is not None else "off",
            **c,
            "spec_acceptance_rate": round(c["spec_accepted_tokens"] / c["spec_draft_tokens"], 4)
            if c["spec_draft_tokens"]
            else 0.0,
            "spec_mean_accepted_length": round(1 + c["spec_accepted_tokens"] / c["spec_drafts"], 4)
            if c["spec_drafts"]
            else 0.0,
        }
