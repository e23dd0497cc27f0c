"""When one sequence's output ends, and what text and tool calls it releases (`TokenStream`),
with the word tokenizer: EOS, `ignore_eos`, stop strings, `max_tokens`, a completed grammar, and
the tool-call section (start / end tokens, one call or several, cut off, not a call at all)."""

from __future__ import annotations

import json

import pytest
from mlx_lm.tool_parsers import mistral
from support.words import WordTokenizer

from server.engine.output.detokenizer import IncrementalDetokenizer, TokenStream
from server.engine.types import OutputConstraint, SamplingParams, ToolCallDelta, ToolSpec


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


class MistralWords(WordTokenizer):
    """WordTokenizer with Mistral's syntax and mlx-lm's `mistral` parser, whose arguments stream:
    `[TOOL_CALLS]name[ARGS]{...}`, no end marker; `split`: the start marker is two tokens."""

    tool_call_start = "[TOOL_CALLS]"
    tool_call_end = ""
    tool_call_end_tokens = None
    tool_parser = staticmethod(mistral.parse_tool_call)

    def __init__(self, split: bool = False) -> None:
        super().__init__()
        marker = ["[TOOL", "_CALLS]"] if split else ["[TOOL_CALLS]"]
        self.tool_call_start_tokens = [self.token_id(piece) for piece in marker]


TOOLS = OutputConstraint(tools=(ToolSpec(name="f"),), tool_choice="auto")


def steps(tok, words, *, prompt="say", complete_at=None, **params):
    """Feed `words` (pieces, special tokens by name) until the stream ends: per token (text,
    reason, the tool-call pieces it released)."""
    params.setdefault("max_tokens", 100)
    stream = TokenStream(tok, tok.encode(prompt), SamplingParams(**params), tok.eos_token_ids)
    out = []
    for i, word in enumerate(words):
        text, reason = stream.add(tok.token_id(word), complete=i == complete_at)
        out.append((text, reason, stream.pop_tool_calls() or []))
        if reason:
            break
    return out


def run(tok, words, **params):
    """`steps` summed up: (text, reason, calls, tokens)."""
    out = steps(tok, words, **params)
    return "".join(t for t, _, _ in out), out[-1][1], [c for _, _, calls in out for c in calls], len(out)


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


def test_a_whole_parsed_call_cut_off_by_max_tokens_comes_out_as_content_and_the_reason_is_length():
    tok = ToolWords()
    text, reason, calls, _ = run(tok, [" hi", "[TOOL_CALLS]", '{"name":'], constraint=TOOLS, max_tokens=3)
    assert (text, reason, calls) == (' hi[TOOL_CALLS]{"name":', "length", [])


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


def pieces(out) -> list[list[tuple[int, bool, str | None, str]]]:
    """Per token of `steps`: its tool-call pieces as (index, has an id, name, arguments)."""
    return [[(c.index, c.id is not None, c.name, c.arguments) for c in calls] for _, _, calls in out]


def joined(calls: list[ToolCallDelta]) -> list[tuple[int, str | None, str]]:
    """(index, name, arguments) per call, its pieces put together as a client does."""
    merged: dict[int, tuple[str | None, str]] = {}
    for c in calls:
        name, arguments = merged.get(c.index, (c.name, ""))
        merged[c.index] = (name, arguments + c.arguments)
    return [(i, *merged[i]) for i in sorted(merged)]


def test_mistral_arguments_stream_as_generated_once_the_name_is_complete():
    words = [" hi", "[TOOL_CALLS]", "get", "_time", "[ARGS]", '{"zone":', ' "UTC"', "}", "</s>"]
    out = steps(MistralWords(), words, constraint=TOOLS)
    assert [(text, reason) for text, reason, _ in out] == [(" hi", None)] + [("", None)] * 7 + [("", "tool_calls")]
    assert pieces(out) == [
        [],
        [],
        [],  # the name may still grow
        [],
        [(0, True, "get_time", "")],
        [(0, False, None, '{"zone":')],
        [(0, False, None, ' "UTC"')],
        [(0, False, None, "}")],
        [],
    ]


def test_mistral_parallel_calls_stream_under_their_own_indices_and_ids():
    tok = MistralWords()
    words = ["[TOOL_CALLS]", "f", "[ARGS]", '{"a": 1}', "[TOOL_CALLS]", "g", "[ARGS]", '{"b":', " [2]}", "</s>"]
    text, reason, calls, _ = run(tok, words, constraint=TOOLS)
    assert (text, reason) == ("", "tool_calls")
    assert [(c.index, c.name) for c in calls if c.id] == [(0, "f"), (1, "g")]
    assert len({c.id for c in calls if c.id}) == 2
    assert joined(calls) == [(0, "f", '{"a": 1}'), (1, "g", '{"b": [2]}')]  # the model's own text


def test_mistral_text_after_a_value_is_not_arguments_and_another_header_there_is_a_call():
    tok = MistralWords()
    value = r'{"a": "}\"{\\"}'  # brackets and an escaped quote inside a string, an escaped backslash
    words = ["[TOOL_CALLS]", "f", "[ARGS]", " " + value, " and", " g", "[ARGS]", "{}", " bye", "</s>"]
    text, reason, calls, _ = run(tok, words, constraint=TOOLS)
    assert (text, reason) == ("", "tool_calls")
    assert joined(calls) == [(0, "f", value), (1, "g", "{}")]
    assert json.loads(value) == {"a": '}"{\\'}


def test_without_parallel_calls_a_streamed_call_ends_the_reply_once_its_arguments_are_complete():
    tok = MistralWords()
    one = OutputConstraint(tools=TOOLS.tools, parallel_tool_calls=False)
    words = ["[TOOL_CALLS]", "f", "[ARGS]", '{"a":', " 1}", "[TOOL_CALLS]", "g", "[ARGS]", "{}"]
    text, reason, calls, n = run(tok, words, constraint=one)
    assert (reason, joined(calls), n) == ("tool_calls", [(0, "f", '{"a": 1}')], 5)


@pytest.mark.parametrize(("end", "reason"), [("length", "length"), ("</s>", "tool_calls")])
def test_a_mistral_call_cut_mid_arguments_comes_back_as_far_as_it_got(end, reason):
    tok = MistralWords()
    words = [" hi", "[TOOL_CALLS]", "f", "[ARGS]", '{"zone":', ' "UT'] + ([end] if end == "</s>" else [])
    text, got, calls, _ = run(tok, words, constraint=TOOLS, max_tokens=6 if end == "length" else 100)
    assert (text, got, joined(calls)) == (" hi", reason, [(0, "f", '{"zone": "UT')])
    assert calls[0].id


def test_a_mistral_call_cut_right_after_its_name_is_a_call_with_empty_arguments():
    tok = MistralWords()
    text, reason, calls, _ = run(tok, [" hi", "[TOOL_CALLS]", "f", "[ARGS]"], constraint=TOOLS, max_tokens=4)
    assert (text, reason, joined(calls)) == (" hi", "length", [(0, "f", "")])


def test_a_cut_before_the_name_is_complete_comes_out_as_content():
    tok = MistralWords()
    text, reason, calls, _ = run(tok, [" hi", "[TOOL_CALLS]", "get", "_ti"], constraint=TOOLS, max_tokens=4)
    assert (text, reason, calls) == (" hi[TOOL_CALLS]get_ti", "length", [])


def test_a_start_marker_split_across_tokens_is_withheld_from_the_arguments():
    tok = MistralWords(split=True)
    words = ["[TOOL", "_CALLS]", "f", "[ARGS]", '{"q": "', "[TOOL", 'S]"}']  # "[TOOL" may start a marker
    words += ["[TOOL", "_CALLS]", "g", "[ARGS]", '{"a":', " 1", "[TOOL", "_CALLS]", "h", "[ARGS]", "{}", "</s>"]
    out = steps(tok, words, constraint=TOOLS)
    assert [piece for token in pieces(out) for piece in token] == [
        (0, True, "f", ""),
        (0, False, None, '{"q": "'),
        (0, False, None, '[TOOLS]"}'),  # held one token, then passed on: it was no marker
        (1, True, "g", ""),
        (1, False, None, '{"a":'),
        (1, False, None, " 1"),  # the model left it unfinished: it stays so, without the marker
        (2, True, "h", ""),
        (2, False, None, "{}"),
    ]
    assert out[-1][1] == "tool_calls"
