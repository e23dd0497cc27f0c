"""Where a load run's chat requests come from: synthetic prompts of a length distribution, or a replay file.

A source hands out request bodies without `model`/`stream` fields; the load generator adds those.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# Common short English words: most byte-level BPE vocabularies hold each as one token with its
# leading space, which keeps the words-to-tokens estimate close without the model's tokenizer.
_WORDS = (
    "the of and to in is was for on are as with his they at be this from have or by one had not but"
    " what all were when we there can an your which their said if do will each about how up out them"
    " then she many some so these would other into has more her two like him see time could no make"
    " than first been its who now people my made over did down only way find use may water long little"
    " very after words called just where most know get through back much before go good new write our"
    " used me man too any day same right look think also around another came come work three word must"
    " because does part even place well such here take why things help put years different away again"
    " off went old number great tell men say small every found still between name should home big give"
    " air line set own under read last never us left end along while might next sound below saw something"
)
DEFAULT_WORDS = tuple(_WORDS.split())
# Numbered words, mixed into every synthetic prompt so that prompts differ whatever the tokenizer:
# a byte-level BPE splits them into a few distinct tokens, and a word-level vocabulary of
# "w0 w1 ..." (the synthetic benchmark checkpoints) knows them where it knows no English word.
NUMBERED_WORDS = tuple(f"w{i}" for i in range(1000))
_TAG_WORDS = 4  # numbered words that open each prompt: distinct from the first token on
_NUMBERED_EVERY = 8  # then one word in this many is numbered


class PromptSource(Protocol):
    def next_body(self) -> dict[str, Any]:
        """A chat request body: `messages` and `max_tokens` (plus whatever a replay line had)."""


@dataclass(frozen=True)
class LengthDist:
    """Prompt length in tokens: `fixed:N`, `uniform:LO:HI` or `normal:MEAN:STD` (clipped to >= 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        kind, *nums = spec.split(":")
        arity = {"fixed": 1, "uniform": 2, "normal": 2}
        if kind not in arity or len(nums) != arity[kind]:
            raise ValueError(f"bad length spec {spec!r}: use fixed:N, uniform:LO:HI or normal:MEAN:STD")
        try:
            values = [float(n) for n in nums]
        except ValueError:
            raise ValueError(f"bad length spec {spec!r}: numbers expected") from None
        if values[0] < 1 or (kind == "uniform" and values[1] < values[0]) or min(values) < 0:
            raise ValueError(f"bad length spec {spec!r}: lengths must be >= 1 and LO <= HI")
        return cls(kind, *values)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            n = self.a
        elif self.kind == "uniform":
            n = rng.uniform(self.a, self.b)
        else:
            n = rng.gauss(self.a, self.b)
        return max(1, round(n))

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a


class SyntheticPrompts:
    """Random-word prompts, distinct from their first words on whatever the tokenizer, so that no
    server's prefix cache helps: each opens with a tag of random numbered words (`NUMBERED_WORDS`)
    and one word in eight is numbered; the rest come from `words`.

    `tokens_per_word` converts the token target into words (see `calibrate_tokens_per_word`);
    `words` is the vocabulary drawn from (see `words_for_tokenizer`).
    """

    def __init__(
        self,
        lengths: LengthDist,
        max_tokens: int,
        tokens_per_word: float = 1.0,
        seed: int = 0,
        words: Sequence[str] = DEFAULT_WORDS,
    ):
        self.lengths = lengths
        self.max_tokens = max_tokens
        self.tokens_per_word = tokens_per_word
        self.words = words
        self._rng = random.Random(seed)

    def next_body(self) -> dict[str, Any]:
        n_words = max(1, round(self.lengths.sample(self._rng) / self.tokens_per_word))
        rng = self._rng
        words = rng.choices(NUMBERED_WORDS, k=min(_TAG_WORDS, n_words))
        for i in range(len(words), n_words):
            words.append(rng.choice(NUMBERED_WORDS if i % _NUMBERED_EVERY == 0 else self.words))
        return {"messages": [{"role": "user", "content": " ".join(words)}], "max_tokens": self.max_tokens}


class ReplayPrompts:
    """Chat requests from a JSONL file (one request body per line, `messages` required), in a loop."""

    def __init__(self, path: str | Path, max_tokens: int):
        bodies: list[dict[str, Any]] = []
        for i, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            body = json.loads(line)
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ValueError(f"{path}:{i}: each line must be a JSON object with a 'messages' list")
            body.setdefault("max_tokens", max_tokens)
            for key in ("model", "stream", "stream_options"):
                body.pop(key, None)
            bodies.append(body)
        if not bodies:
            raise ValueError(f"{path}: no requests")
        self._cycle = itertools.cycle(bodies)

    def next_body(self) -> dict[str, Any]:
        return dict(next(self._cycle))


def words_for_tokenizer(tokenizer_json: str | Path, n: int = 512) -> Sequence[str]:
    """Prompt words that stay distinct tokens under a Hugging Face `tokenizer.json`.

    A word-level vocabulary (such as the synthetic benchmark checkpoints' "w0 w1 ...") turns the
    default English words into one unknown token, which would make every prompt the same token
    string and hand servers' prefix caches a win; then its own plain words are used instead.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = tok.encode(" ".join(DEFAULT_WORDS), add_special_tokens=False).ids
    if len(set(ids)) > len(DEFAULT_WORDS) // 2:
        return DEFAULT_WORDS
    plain = sorted(w for w in tok.get_vocab() if re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", w))
    if not plain:
        raise ValueError(f"{tokenizer_json}: no plain words to build prompts from")
    return tuple(plain[:: max(1, len(plain) // n)][:n])


def calibrate_tokens_per_word(
    tokenizer_json: str | Path, words: Sequence[str] = DEFAULT_WORDS, n_words: int = 2000, seed: int = 0
) -> float:
    """Tokens per prompt word under a Hugging Face `tokenizer.json` (the `tokenizers` library)."""
    from tokenizers import Tokenizer

    source = SyntheticPrompts(LengthDist("fixed", n_words), max_tokens=1, seed=seed, words=words)
    text = source.next_body()["messages"][0]["content"]
    n_tokens = len(Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids)
    return max(n_tokens, 1) / n_words
