"""`TokenBytes`: each token's own bytes, so that logprob entries join back into the exact text."""

from __future__ import annotations

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from server.engine.model.demo_model import ensure_demo_model
from server.engine.output.token_bytes import TokenBytes, _gpt2_byte_decoder


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ensure_demo_model())


@pytest.mark.parametrize("text", ["In the beginning", "café naïve 東京 😀", " leading  spaces\nand lines"])
def test_the_bytes_of_a_texts_tokens_join_into_its_utf8(tokenizer, text):
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(token_bytes(t) for t in ids) == text.encode("utf-8")


def test_a_token_holding_part_of_a_character_gives_those_bytes_not_a_replacement_char(tokenizer):
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer.encode("東", add_special_tokens=False)
    assert len(ids) > 1  # the demo tokenizer spells it in byte tokens
    pieces = [token_bytes(t) for t in ids]
    assert all(b"\xef\xbf\xbd" not in p for p in pieces) and b"".join(pieces) == "東".encode()


def test_special_tokens_have_no_bytes(tokenizer):
    token_bytes = TokenBytes(tokenizer)
    assert all(token_bytes(t) == b"" for t in tokenizer.eos_token_ids)


def test_the_gpt2_table_covers_every_byte_once():
    table = _gpt2_byte_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["A"] == ord("A") and table["\u0120"] == ord(" ")  # GPT-2 spells a space Ġ
