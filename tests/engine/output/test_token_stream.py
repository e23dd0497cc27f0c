"""When one sequence's output ends, and what text and tool calls it releases (`TokenStream`),
with the word tokenizer: EOS, `ignore_eos`, stop strings, `max_tokens`, a completed grammar, and
the tool-call section (start / end tokens, one call or several, cut off, not a call at all)."""

from __future__ import annotations

import json

import pytest
from support.words import WordTokenizer

from server.engine.output.detokenizer import IncrementalDetokenizer, TokenStream
from server.engine.types import OutputConstraint, SamplingParams, ToolSpec


class ToolWords(WordTokenizer):
    """WordTokenizer with a Mistral-like tool syntax: "[TOOL_CALLS]" opens a section, "[/TC]"
    closes it, and the section's text is a JSON call (or list of calls)."""

    tool_call_start = "[TOOL_CALLS]"

    def __init__(self, end: bool = True) -> None:
        super().__init__()
        self.tool_call_end = "[/TC]" if end else ""
        self.tool_call_start_tokens = [self.special_id(self.tool_call_start)]
        self.tool_call_end_tokens = [self.special_id("[/TC]")]

    @staticmethod
    def tool_parser(text: str, tools: object) -> object:
        return json.loads(text)


TOOLS = OutputConstraint(tools=(ToolSpec(name="f"),), tool_choice="auto")


def run(tok, words, *, prompt="say", complete_at=None, **params):
    """Feed `words` (pieces, special tokens by name) until the stream ends: (text, reason, calls, tokens)."""
    params.setdefault("max_tokens", 100)
    stream = TokenStream(tok, tok.encode(prompt), SamplingParams(**params), tok.eos_token_ids)
    text, calls = "", []
    for i, word in enumerate(words):
        delta, reason = stream.add(tok.token_id(word), complete=i == complete_at)
        text += delta
        calls += stream.pop_tool_calls() or []
        if reason:
            return text, reason, calls, stream.num_tokens
    return text, None, calls, stream.num_tokens


def test_eos_ends_with_stop_and_is_not_text():
    tok = WordTokenizer()
    assert run(tok, [" a", " b", "</s>", " c"]) == (" a b", "stop", [], 3)


def test_ignore_eos_runs_on_to_max_tokens():
    tok = WordTokenizer()
    text, reason, _, n = run(tok, [" a", "</s>", " b", " c"], ignore_eos=True, max_tokens=3)
    assert (text, reason, n) == (" a b", "length", 3)


@pytest.mark.parametrize("max_tokens", [1, 2, 3])
def test_max_tokens_ends_with_length_exactly_there(max_tokens):
    tok = WordTokenizer()
    text, reason, _, n = run(tok, [" a", " b", " c", " d"], max_tokens=max_tokens)
    assert (reason, n) == ("length", max_tokens)
    assert text == "".join([" a", " b", " c"][:max_tokens])


def test_max_tokens_must_be_fitted_first():
    with pytest.raises(ValueError, match="fit_to_context"):
        TokenStream(WordTokenizer(), [], SamplingParams(max_tokens=None), set())


def test_a_stop_string_ends_with_stop_and_cuts_the_text():
    tok = WordTokenizer()
    assert run(tok, [" a", " b", " STOP", " c"], stop=["STOP"])[:3] == (" a b ", "stop", [])


@pytest.mark.parametrize("end", ["</s>", "length"])
def test_a_held_back_stop_prefix_is_released_when_the_output_ends_otherwise(end):
    tok = WordTokenizer()
    words = [" a", " ST"] + (["</s>"] if end == "</s>" else [])
    text, reason, _, _ = run(tok, words, stop=["STOP"], max_tokens=2 if end == "length" else 10)
    assert text == " a ST" and reason == ("stop" if end == "</s>" else "length")


def test_a_completed_grammar_ends_with_stop_on_that_token():
    tok = WordTokenizer()
    assert run(tok, [" a", " b", " c"], complete_at=1)[:2] == (" a b", "stop")


def test_the_first_output_token_is_decoded_after_the_prompt():
    tok = WordTokenizer()
    detok = IncrementalDetokenizer(tok, tok.encode("one two three four five six seven"), [])
    assert detok.add(tok.token_id(" eight")) + detok.finish() == " eight"


def test_stop_strings_spanning_tokens_are_cut_and_the_rest_never_emitted():
    tok = WordTokenizer()
    detok = IncrementalDetokenizer(tok, None, ["b c", "zz"])
    out = [detok.add(tok.token_id(w)) for w in ["a", " b", " c", " d"]]
    assert "".join(out) == "a " and detok.stopped and detok.finish() == ""


CALL = '{"name":"f","arguments":{"x":1}}'


def test_a_tool_section_becomes_a_call_and_the_reply_ends_with_tool_calls():
    tok = ToolWords()
    text, reason, calls, _ = run(tok, [" hi", "[TOOL_CALLS]", CALL, "[/TC]", "</s>"], constraint=TOOLS)
    assert text == " hi" and reason == "tool_calls"
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [(0, "f", {"x": 1})]
    assert calls[0].id


def test_content_after_a_closed_section_is_text():
    tok = ToolWords()
    text, reason, calls, _ = run(tok, ["[TOOL_CALLS]", CALL, "[/TC]", " after", "</s>"], constraint=TOOLS)
    assert (text, reason, len(calls)) == (" after", "tool_calls", 1)


def test_a_section_left_open_is_closed_at_eos():
    tok = ToolWords(end=False)
    text, reason, calls, _ = run(tok, ["[TOOL_CALLS]", CALL, "</s>"], constraint=TOOLS)
    assert (text, reason, [c.name for c in calls]) == ("", "tool_calls", ["f"])


def test_without_parallel_calls_the_reply_ends_after_one_call():
    tok = ToolWords()
    one = OutputConstraint(tools=TOOLS.tools, parallel_tool_calls=False)
    text, reason, calls, n = run(tok, ["[TOOL_CALLS]", CALL, CALL, "[/TC]"], constraint=one)
    assert (reason, len(calls), n) == ("tool_calls", 1, 2)


def test_a_call_cut_off_by_max_tokens_is_dropped_and_the_reason_is_length():
    tok = ToolWords()
    text, reason, calls, _ = run(tok, [" hi", "[TOOL_CALLS]", '{"name":'], constraint=TOOLS, max_tokens=3)
    assert (text, reason, calls) == (" hi", "length", [])


def test_an_open_section_that_is_not_a_call_comes_out_as_text_and_the_reason_stays_stop():
    tok = ToolWords(end=False)
    text, reason, calls, _ = run(tok, [" hi", "[TOOL_CALLS]", " nope", "</s>"], constraint=TOOLS)
    assert (text, reason, calls) == (" hi[TOOL_CALLS] nope", "stop", [])


@pytest.mark.parametrize("constraint", [None, OutputConstraint(tools=TOOLS.tools, tool_choice="none")])
def test_without_tools_offered_the_syntax_is_plain_text(constraint):
    tok = ToolWords()
    text, reason, calls, _ = run(tok, [" hi", "[TOOL_CALLS]", CALL, "</s>"], constraint=constraint)
    assert (reason, calls) == ("stop", []) and text.endswith(CALL)


def test_a_tokenizer_without_a_tool_parser_streams_text():
    tok = WordTokenizer()
    text, reason, calls, _ = run(tok, [" hi", CALL, "</s>"], constraint=TOOLS)
    assert (text, reason, calls) == (" hi" + CALL, "stop", [])


def test_text_held_back_for_a_stop_string_is_released_when_a_tool_section_opens():
    tok = ToolWords()
    text, reason, calls, _ = run(
        tok, [" a", " ST", "[TOOL_CALLS]", CALL, "[/TC]", "</s>"], stop=["STOP"], constraint=TOOLS
    )
    assert (text, reason, len(calls)) == (" a ST", "tool_calls", 1)


def test_text_that_cannot_start_a_stop_string_is_released_at_once():
    tok = WordTokenizer()
    detok = IncrementalDetokenizer(tok, None, ["STOP"])
    assert [detok.add(tok.token_id(w)) for w in ["a", " b", " S", " c"]] == ["a", " b", " ", "S c"]


def test_a_closed_section_that_is_not_a_call_comes_out_as_text():
    tok = ToolWords()
    text, reason, calls, _ = run(tok, [" hi", "[TOOL_CALLS]", " nope", "[/TC]", " after", "</s>"], constraint=TOOLS)
    assert calls == [] and reason == "stop"
    assert text == " hi[TOOL_CALLS] nope after"
