"""A tiny tokenizer whose tokens are words, for the fake engine and detokenizer tests.

It has what `server.engine.output.detokenizer` needs of a Hugging Face tokenizer: `decode(ids,
skip_special_tokens=..., clean_up_tokenization_spaces=...)` and `eos_token_ids`. Decoding
concatenates the tokens' pieces, so a piece carries its own leading space (" there"), as
byte-level BPE pieces do; special tokens (role markers, EOS) decode to nothing when skipped.
Ids are handed out in order of first appearance, after the special tokens.
"""

from __future__ import annotations

EOS = "</s>"


class WordTokenizer:
    def __init__(self) -> None:
        self.pieces: list[str] = []
        self._ids: dict[str, int] = {}
        self.special: set[int] = set()
        self.eos_token_id = self.special_id(EOS)
        self.eos_token_ids = {self.eos_token_id}

    def token_id(self, piece: str) -> int:
        if piece not in self._ids:
            self._ids[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self._ids[piece]

    def special_id(self, piece: str) -> int:
        """The id of a special token such as "<user>" (skipped by `decode` when asked)."""
        token = self.token_id(piece)
        self.special.add(token)
        return token

    def encode(self, text: str) -> list[int]:
        """One token per whitespace-separated word; every word but the first carries a space."""
        return [self.token_id(w if i == 0 else f" {w}") for i, w in enumerate(text.split())]

    def piece(self, token_id: int) -> str:
        return self.pieces[token_id]

    def decode(
        self, ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i in self.special))
