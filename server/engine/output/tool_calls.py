"""Tool calls in a model's output: the owner of tool-call syntax, parsing and streaming.

The syntax is the tokenizer's, as mlx-lm picks it (`mlx_lm.tokenizer_utils.load`: a
`tool_parser_type` in the tokenizer config, else inferred from the chat template): the wrapper
carries `tool_call_start` / `tool_call_end` and the parser `tool_parser(text, tools)`.

`ToolCallStream` follows one reply. From the tool-call start token on, the text (a section, up to
the end token or the next start token) is withheld from the content and passed on as
`ToolCallDelta`s, as OpenAI streams calls: a call's first piece carries its index, id and name,
later pieces fragments of its arguments; the whole reply is the same pieces put together
(`ChoiceState`), so what a client concatenates is exactly what the whole reply reports.

- Mistral's syntax (`[TOOL_CALLS]name[ARGS]{...}`, repeated for parallel calls), read here as
  it grows rather than by mlx-lm's parser: a call begins once its name is complete (its `[ARGS]`
  came), then the model's own arguments text is passed on as its tokens arrive, up to the end of
  the JSON value (brackets counted outside strings). It is not re-serialised: the fragments are
  the JSON the model wrote. Withheld until later tokens tell: a tail that may still become a
  start or end marker (a marker of several tokens shows its first ones as text) and an
  incomplete UTF-8 character. Text after the value is dropped unless it holds another
  `name[ARGS]`, as mlx-lm's parser does.
- Any other syntax, and Mistral's older form `[TOOL_CALLS][{"name": ..., "arguments": ...}]`:
  the section is parsed with the model's parser after each token and each call comes out in one
  piece (index, id (the model's, when the parser gives one), name, the whole arguments as JSON)
  once it parses complete; what a parser makes of a partial call says nothing safe about the
  arguments text to come.

How a section ends does not change what was passed on. A call begun and then cut (max_tokens:
finish "length"; or the model's end of text, or a new start token, mid-arguments) stays as it
got: its id, name and the arguments so far, which are then not valid JSON. A section that began
no call (text that is not one, a cut before the name was complete, or a whole-parsed call cut
before it parsed) is passed on as content, start marker included: a partial name is no call.

`ToolSyntax` writes the grammar of the same syntax for `constraints.py`, so that tool_choice
"required" or a named function is enforced while decoding (a call then ends unfinished only when
max_tokens cuts it). Only Mistral's syntax has a grammar so far.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..types import ToolCallDelta, ToolSpec

_INCOMPLETE = "\ufffd"
# A Mistral call's header, as mlx-lm's `mistral` parser finds it (the first one from a position).
_HEADER = re.compile(r"([\w-]+)\s*\[ARGS\]")


def _parser_name(tokenizer: Any) -> str | None:
    parser = getattr(tokenizer, "tool_parser", None)
    if parser is None or getattr(tokenizer, "tool_call_start", None) is None:
        return None
    module: str = getattr(parser, "__module__", "") or ""
    return module.rsplit(".", 1)[-1]


def _single_token(tokenizer: Any, text: str) -> int | None:
    """The id of `text` when the tokenizer has it as one token."""
    try:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    except Exception:
        return None
    return ids[0] if len(ids) == 1 else None


class ToolSyntax:
    """Mistral's tool-call syntax, as a grammar: `[TOOL_CALLS]name[ARGS]{arguments}`, once per call."""

    def __init__(self, start_id: int, args_id: int | None) -> None:
        self.start_id = start_id
        self._args = f"<[{args_id}]>" if args_id is not None else json.dumps("[ARGS]")

    def lark_rules(
        self, tools: list[ToolSpec], parallel: bool, json_rule: Callable[[dict[str, Any]], str]
    ) -> list[str]:
        """Rules defining `calls`: one call (or more, when `parallel`) of `tools`."""
        rules = [
            f"calls: call{'+' if parallel else ''}",
            f"call: <[{self.start_id}]> ({' | '.join(_fn(i) for i in range(len(tools)))})",
        ]
        for i, tool in enumerate(tools):
            schema = tool.parameters or {"type": "object", "properties": {}, "additionalProperties": False}
            rules.append(f"{_fn(i)}: {json.dumps(tool.name)} {self._args} {json_rule(schema)}")
        return rules


def _fn(i: int) -> str:
    return f"fn_{i}"


def tool_syntax(tokenizer: Any) -> ToolSyntax | None:
    """The grammar-ready tool syntax of a tokenizer, or None when it has none the server knows."""
    if _parser_name(tokenizer) != "mistral":
        return None
    start = _single_token(tokenizer, tokenizer.tool_call_start)
    if start is None:
        return None
    return ToolSyntax(start, _single_token(tokenizer, "[ARGS]"))


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def held_tail(text: str, strings: Iterable[str]) -> int:
    """Length of the longest tail of `text` that could still grow into one of `strings` (a proper
    prefix of one): text to hold back until the next token tells."""
    return max((n for s in strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@dataclass
class _OpenCall:
    """A streaming call's arguments: how far the section's text was read, and where its JSON value
    stands (brackets are counted outside strings, so the value's end is known when it comes)."""

    index: int
    read: int  # section text position up to which the arguments were read
    begun: bool = False  # the value's first character came (whitespace before it is not passed on)
    depth: int = 0
    string: bool = False
    escape: bool = False

    def take(self, text: str, limit: int) -> tuple[str, bool]:
        """(the arguments text in text[read:limit], whether the JSON value ended in it)."""
        start = self.read
        while self.read < limit:
            ch = text[self.read]
            self.read += 1
            if not self.begun and ch.isspace():
                start = self.read
                continue
            self.begun = True
            ended = False
            if self.string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.string = False
                    ended = self.depth == 0
            elif ch == '"':
                self.string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                ended = self.depth == 0
            if ended:
                return text[start : self.read], True
        return text[start:limit], False


@dataclass
class _Section:
    """The tokens after one tool-call start token, and how far their calls were passed on."""

    ids: list[int] = field(default_factory=list)
    calls: int = 0  # calls begun in this section
    whole: bool | None = None  # parsed whole rather than streamed; None until its first character
    next_header: int = 0  # text position from which the next `name[ARGS]` is looked for
    open: _OpenCall | None = None  # the call whose arguments are streaming


class ToolCallStream:
    """Splits one reply into content and tool calls, token by token.

    `feed` returns what a token does: ("content", []) when it is ordinary text for the content
    detokenizer, ("start", deltas) when it opens a tool-call section, ("tool", deltas) when it is
    part of one, ("end", deltas) when it closes a section (deltas: the call pieces it released).
    """

    def __init__(self, tokenizer: Any, parallel: bool) -> None:
        self._tokenizer = tokenizer
        self._parse: Callable[[str, Any], Any] = tokenizer.tool_parser
        self._start = tuple(tokenizer.tool_call_start_tokens or ())
        end = getattr(tokenizer, "tool_call_end", "") or ""
        self._end = tuple(tokenizer.tool_call_end_tokens or ()) if end else ()
        # A marker of more than one token shows its first tokens' text in the section before it
        # is recognised: a tail that may still become one is not passed on as arguments.
        self._markers = [m for m, ids in ((tokenizer.tool_call_start, self._start), (end, self._end)) if len(ids) > 1]
        self._streams_arguments = _parser_name(tokenizer) == "mistral"
        self.parallel = parallel
        self.active = False
        self.count = 0  # calls begun so far (the next call's index)
        self._complete = 0  # calls whose arguments are complete
        self._section = _Section()
        self._recent: list[int] = []
        self._leftover = ""  # a closed section's text that held no call, to pass on as content

    @property
    def satisfied(self) -> bool:
        """Without parallel calls, the reply is over once one call is complete."""
        return not self.parallel and self._complete >= 1

    def feed(self, token_id: int) -> tuple[str, list[ToolCallDelta]]:
        self._recent = (self._recent + [token_id])[-max(len(self._start), len(self._end), 1) :]
        if self._start and tuple(self._recent[-len(self._start) :]) == self._start:
            deltas: list[ToolCallDelta] = []
            self._leftover = ""
            if self.active:
                deltas, self._leftover = self._close_at_marker(len(self._start))
            self.active = True
            self._section = _Section()
            return "start", deltas
        if not self.active:
            return "content", []
        if self._end and tuple(self._recent[-len(self._end) :]) == self._end:
            deltas, self._leftover = self._close_at_marker(len(self._end))
            return "end", deltas
        self._section.ids.append(token_id)
        return "tool", self._advance(final=False)

    def take_leftover(self) -> str:
        """The text of the section `feed` just closed when it held no call (else "")."""
        text, self._leftover = self._leftover, ""
        return text

    def close(self) -> tuple[list[ToolCallDelta], str]:
        """End the open section: (the call pieces it still held, its text when it began no call).

        A section that began no call (not a call at all, or cut before a name was complete) is
        passed on as content, its start marker included; a call already begun stays as it got."""
        if not self.active:
            return [], ""
        self.active = False
        deltas = self._advance(final=True)
        leftover = ""
        if not self._section.calls and self._section.ids:
            leftover = self._tokenizer.tool_call_start + self._text()
        return deltas, leftover

    def _close_at_marker(self, marker_len: int) -> tuple[list[ToolCallDelta], str]:
        # The marker's tokens before the last were taken as section tokens: they are not its text.
        del self._section.ids[max(0, len(self._section.ids) - (marker_len - 1)) :]
        return self.close()

    def _text(self) -> str:
        # No clean-up of tokenization spaces: text passed on must never change as tokens come.
        text: str = self._tokenizer.decode(
            self._section.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return text

    def _advance(self, final: bool) -> list[ToolCallDelta]:
        """The call pieces the section's text releases now (final: it ends here)."""
        section, text = self._section, self._text()
        if section.whole is None and text.strip():
            # Mistral's older form, `[TOOL_CALLS][{"name": ..., "arguments": ...}]`, is parsed whole.
            section.whole = not self._streams_arguments or text.lstrip().startswith("[")
        if section.whole is None:
            return []
        return self._whole_calls(text, final) if section.whole else self._streamed_calls(text, final)

    def _whole_calls(self, text: str, final: bool) -> list[ToolCallDelta]:
        """Each call the model's parser finds complete, in one piece."""
        if not final and text.endswith(_INCOMPLETE):
            return []
        try:
            parsed = self._parse(text.strip(), None)
        except Exception:  # incomplete (or, at the end, not a call at all)
            return []
        calls = [c for c in (parsed if isinstance(parsed, list) else [parsed]) if isinstance(c, dict)]
        deltas = []
        for call in [c for c in calls if isinstance(c.get("name"), str)][self._section.calls :]:
            if self.satisfied:
                break
            arguments = call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            call_id = call.get("id")
            delta = self._begin(call["name"], call_id if isinstance(call_id, str) else None)
            delta.arguments = arguments
            self._complete += 1
            deltas.append(delta)
        return deltas

    def _streamed_calls(self, text: str, final: bool) -> list[ToolCallDelta]:
        """Mistral's `name[ARGS]{...}` calls: a call begins once its name is complete, then its
        arguments text is passed on as it comes, up to the end of its JSON value."""
        section = self._section
        # An incomplete character is withheld, and dropped if the section ends on it.
        text = text.rstrip(_INCOMPLETE)
        limit = len(text) if final else len(text) - held_tail(text, self._markers)
        deltas: list[ToolCallDelta] = []
        while True:
            if section.open is None:
                header = None if self.satisfied else _HEADER.search(text, section.next_header, limit)
                if header is None:
                    return deltas
                deltas.append(self._begin(header.group(1)))
                section.open = _OpenCall(deltas[-1].index, header.end())
            arguments, ended = section.open.take(text, limit)
            if arguments and deltas and deltas[-1].index == section.open.index:
                deltas[-1].arguments += arguments
            elif arguments:
                deltas.append(ToolCallDelta(index=section.open.index, arguments=arguments))
            if not ended:
                return deltas
            # What follows the value is not this call's; only another header there is read.
            section.next_header, section.open = section.open.read, None
            self._complete += 1

    def _begin(self, name: str, call_id: str | None = None) -> ToolCallDelta:
        """A new call's first piece: its index, id and name."""
        delta = ToolCallDelta(index=self.count, id=call_id or new_call_id(), name=name)
        self.count += 1
        self._section.calls += 1
        return delta
