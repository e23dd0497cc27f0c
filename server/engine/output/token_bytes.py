"""The bytes each token stands for.

A byte-level BPE or byte-fallback token may hold part of a UTF-8 character: decoded alone it shows
U+FFFD, so logprobs built from decoded text could not be joined back into the content. This reads
the bytes from the token's own spelling, the way mlx-lm's streaming detokenizer for the tokenizer
does (mlx-lm picks the kind; its byte table is GPT-2's).
"""

from __future__ import annotations

from typing import Any

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

_SPM_SPACE = "\u2581"


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted: printable bytes map to themselves,
    the others to the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenBytes:
    """`token_bytes(token_id)`: the token's bytes under `tokenizer` (mlx-lm's TokenizerWrapper);
    none for special tokens, which the detokenizer leaves out of the text."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        detokenizer = getattr(tokenizer, "detokenizer", None)
        self._kind = (
            "bpe"
            if isinstance(detokenizer, BPEStreamingDetokenizer)
            else "spm"
            if isinstance(detokenizer, SPMStreamingDetokenizer)
            else "text"
        )
        self._byte_decoder = _gpt2_byte_decoder() if self._kind == "bpe" else {}
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._special = {i for i, t in added.items() if getattr(t, "special", False)}
        self._special |= set(getattr(tokenizer, "all_special_ids", None) or [])

    def __call__(self, token_id: int) -> bytes:
        if token_id in self._special:  # the streamed text skips special tokens, so do their bytes
            return b""
        if self._kind == "text":
            text: str = self._tokenizer.decode([token_id])
            return text.encode("utf-8")
        spelling: str | None = self._tokenizer.convert_ids_to_tokens([token_id])[0]
        if spelling is None:  # an id the model has a row for but the vocabulary does not name
            return b""
        if self._kind == "spm":
            if spelling.startswith("<0x") and spelling.endswith(">") and len(spelling) == 6:
                return bytes([int(spelling[3:5], 16)])
            return spelling.replace(_SPM_SPACE, " ").encode("utf-8")
        out = bytearray()
        for char in spelling:
            byte = self._byte_decoder.get(char)
            out.extend(char.encode("utf-8") if byte is None else bytes([byte]))
        return bytes(out)
