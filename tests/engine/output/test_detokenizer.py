import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from server.engine.output.detokenizer import IncrementalDetokenizer

CORPUS = [
    "Hello world, the answer is 42. The end of the story.",
    "Streaming text one token at a time, without splitting characters.",
    "今天天气很好。我们去公园散步吧。東京は晴れです。",
    "中文字符和日本語の文字を混ぜたテキスト。",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "Café naïve façade — déjà vu. Ελληνικά Русский текст.",
]
SAMPLES = [
    "今天天气很好，我们去散步。",
    "Party 🎉😀 time 👍🏽 and 👨‍👩‍👧 go!",
    "Mixed 中文 and emoji 🇯🇵 with café.",
    "東京は晴れです 😀",
]


@pytest.fixture(scope="module")
def byte_bpe() -> PreTrainedTokenizerFast:
    """A small byte-level BPE: multi-byte characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def spm_bpe() -> PreTrainedTokenizerFast:
    """A SentencePiece-style (Llama / Mistral) tokenizer: '▁' marks spaces, bytes fall back."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?0123456789"
    for piece in ["▁", *letters, *("▁" + c for c in letters)]:
        vocab[piece] = len(vocab)
    merges = [("▁", c) for c in letters]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _stream(tokenizer, ids, prompt=None, stop=()):
    """All deltas, the final flush last (empty if a stop string ended the stream)."""
    detok = IncrementalDetokenizer(tokenizer, prompt, list(stop))
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.finish())
    return deltas, detok


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_characters_span_tokens_in_these_tokenizers(byte_bpe, spm_bpe):
    # Guards the UTF-8 tests below against a tokenizer that happens to keep characters whole.
    for tok in (byte_bpe, spm_bpe):
        pieces = [_decode(tok, [t]) for t in tok.encode(" ".join(SAMPLES))]
        assert any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("wrap", [False, True], ids=["hf", "mlx_lm_wrapper"])
@pytest.mark.parametrize("which", ["byte_bpe", "spm_bpe"])
def test_utf8_stream_equals_full_decode(request, which, wrap):
    tok = request.getfixturevalue(which)
    tokenizer = TokenizerWrapper(tok) if wrap else tok
    for text in SAMPLES:
        ids = tok.encode(text, add_special_tokens=False)
        deltas, _ = _stream(tokenizer, ids)
        assert not any("\ufffd" in d for d in deltas), deltas
        assert "".join(deltas) == _decode(tok, ids) == text


def test_partial_characters_are_released_once_complete(byte_bpe):
    # A token can end in the first bytes of a character after some complete ones: the complete
    # ones go out at once, the rest with the token that completes it.
    ids = byte_bpe.encode("今天天气很好，我们去散步。")
    detok = IncrementalDetokenizer(byte_bpe, None, [])
    emitted = ""
    for i, t in enumerate(ids):
        emitted += detok.add(t)
        full = _decode(byte_bpe, ids[: i + 1])
        assert emitted == full.rstrip("\ufffd")


def test_spm_leading_space_follows_context(spm_bpe):
    prompt = spm_bpe.encode("Hello", add_special_tokens=False)
    out = spm_bpe.encode(" world, 今天 ok", add_special_tokens=False)
    assert out[0] == spm_bpe.convert_tokens_to_ids("▁w")
    deltas, _ = _stream(spm_bpe, out, prompt=prompt)
    assert "".join(deltas) == " world, 今天 ok"
    assert deltas[0] == " w"  # a per-token decode would drop this space
    # Without context the leading space goes, as in a full decode of the output alone.
    deltas, _ = _stream(spm_bpe, out)
    assert "".join(deltas) == _decode(spm_bpe, out) == "world, 今天 ok"


def test_special_tokens_are_skipped(byte_bpe):
    ids = byte_bpe.encode("Hello 😀") + [byte_bpe.eos_token_id]
    deltas, _ = _stream(byte_bpe, ids, prompt=[byte_bpe.bos_token_id])
    assert "".join(deltas) == "Hello 😀"


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("Hello world, the answer is 42. The end of the story.", ["end of"], "Hello world, the answer is 42. The "),
        ("Hello world, the answer is 42. The end of the story.", ["story", "42."], "Hello world, the answer is "),
        ("今天天气很好，我们去散步。", ["去散"], "今天天气很好，我们"),
        ("Party 🎉😀 time 👍🏽 and go!", ["😀 ti"], "Party 🎉"),
        ("Hello world", ["world"], "Hello "),
    ],
)
def test_stop_strings_across_tokens_never_leak(byte_bpe, text, stop, expected):
    ids = byte_bpe.encode(text)
    pieces = [_decode(byte_bpe, [t]) for t in ids]
    assert not any(any(s in p for s in stop) for p in pieces), "stop must span tokens"
    more = byte_bpe.encode(" and more text after the stop 😀")
    deltas, detok = _stream(byte_bpe, ids + more, stop=stop)
    assert detok.stopped
    assert "".join(deltas) == expected
    assert not any("\ufffd" in d for d in deltas)


def test_text_held_for_a_possible_stop_is_released(byte_bpe):
    text = "The end is near. The en"
    ids = byte_bpe.encode(text)
    detok = IncrementalDetokenizer(byte_bpe, None, ["end of", "XYZ"])
    emitted = ""
    for t in ids:
        emitted += detok.add(t)
        assert text.startswith(emitted)
    assert emitted == "The end is near. The "  # "en" could still become "end of"
    assert emitted + detok.finish() == text
    assert not detok.stopped


def test_stop_string_text_is_never_taken_back(byte_bpe):
    text = "the answer is 42. The end of the story."
    ids = byte_bpe.encode(text)
    final = text[: text.index("end of")]
    detok = IncrementalDetokenizer(byte_bpe, None, ["end of", "answer was"])
    emitted = ""
    for t in ids:
        emitted += detok.add(t)
        assert final.startswith(emitted)
    assert detok.stopped and emitted == final
    assert detok.add(ids[0]) == "" and detok.finish() == ""


def test_cost_per_token_does_not_grow(byte_bpe, monkeypatch):
    ids = byte_bpe.encode(" ".join(SAMPLES * 30))
    seen = []
    real = byte_bpe.decode

    def counting(tokens, **kw):
        seen.append(len(tokens))
        return real(tokens, **kw)

    monkeypatch.setattr(byte_bpe, "decode", counting)
    deltas, _ = _stream(byte_bpe, ids)
    monkeypatch.undo()
    assert "".join(deltas) == _decode(byte_bpe, ids)
    assert len(ids) > 500 and max(seen) <= 12
    assert len(seen) <= 2 * len(ids) + 4
