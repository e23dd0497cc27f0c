"""Tool calls in a model's output: the owner of tool-call syntax, parsing and streaming.

The syntax is the tokenizer's, as mlx-lm picks it (`mlx_lm.tokenizer_utils.load`: a
`tool_parser_type` in the tokenizer config, else inferred from the chat template): the wrapper
carries `tool_call_start` / `tool_call_end` and the parser `tool_parser(text, tools)`.

`ToolCallStream` follows one reply: once the tool-call start token appears, the text that
follows is withheld from the content and parsed with the model's parser as it grows; each call
is passed on as one `ToolCallDelta` (index, id, name and the whole arguments JSON) as soon as it
parses complete. `ToolSyntax` writes the grammar of the same syntax for `constraints.py`, so that
tool_choice "required" or a named function is enforced while decoding. Only Mistral's syntax
(`[TOOL_CALLS]name[ARGS]{...}`, repeated for parallel calls) has a grammar so far.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from ..types import ToolCallDelta, ToolSpec

_INCOMPLETE = "\ufffd"


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


class ToolCallStream:
    """Splits one reply into content and tool calls, token by token.

    `feed` returns what a token does: ("content", None) when it is ordinary text for the content
    detokenizer, ("start", None) when it opens a tool-call section, ("tool", deltas) when it is
    part of one (deltas: the calls it completed), ("end", deltas) when it closes a section.
    """

    def __init__(self, tokenizer: Any, parallel: bool) -> None:
        self._tokenizer = tokenizer
        self._parse: Callable[[str, Any], Any] = tokenizer.tool_parser
        self._start = tuple(tokenizer.tool_call_start_tokens or ())
        end = getattr(tokenizer, "tool_call_end", "") or ""
        self._end = tuple(tokenizer.tool_call_end_tokens or ()) if end else ()
        self.parallel = parallel
        self.active = False
        self.count = 0  # calls passed on so far
        self._ids: list[int] = []  # the open section's tokens
        self._in_section = 0  # calls of the open section passed on
        self._recent: list[int] = []
        self._leftover = ""  # a closed section's text that held no call, to pass on as content

    @property
    def satisfied(self) -> bool:
        """Without parallel calls, the reply is over once one call is complete."""
        return not self.parallel and self.count >= 1

    def feed(self, token_id: int) -> tuple[str, list[ToolCallDelta]]:
        self._recent = (self._recent + [token_id])[-max(len(self._start), len(self._end), 1) :]
        if self._start and tuple(self._recent[-len(self._start) :]) == self._start:
            deltas, self._leftover = self.close() if self.active else ([], "")
            self.active = True
            self._ids, self._in_section = [], 0
            return "start", deltas
        if not self.active:
            return "content", []
        if self._end and tuple(self._recent[-len(self._end) :]) == self._end:
            self._ids = self._ids[: len(self._ids) - len(self._end) + 1]
            deltas, self._leftover = self.close()
            return "end", deltas
        self._ids.append(token_id)
        return "tool", self._emit(self._calls(final=False))

    def take_leftover(self) -> str:
        """The text of the section `feed` just closed when it held no call (else "")."""
        text, self._leftover = self._leftover, ""
        return text

    def close(self, truncated: bool = False) -> tuple[list[ToolCallDelta], str]:
        """End the open section: (the calls it still held, its text when nothing in it parsed).

        truncated: the reply was cut off (max_tokens); an unfinished call is then dropped, not
        passed on as text."""
        if not self.active:
            return [], ""
        self.active = False
        calls = self._calls(final=True)
        deltas = self._emit(calls)
        leftover = ""
        if not truncated and not calls and self._in_section == 0 and self._ids:
            leftover = self._tokenizer.tool_call_start + self._text()  # not a call: pass it on as text
        return deltas, leftover

    def _text(self) -> str:
        text: str = self._tokenizer.decode(self._ids, skip_special_tokens=False)
        return text

    def _calls(self, final: bool) -> list[dict[str, Any]]:
        text = self._text()
        if not text.strip() or (not final and text.endswith(_INCOMPLETE)):
            return []
        try:
            parsed = self._parse(text.strip(), None)
        except Exception:  # incomplete (or, at the end, not a call at all)
            return []
        calls = parsed if isinstance(parsed, list) else [parsed]
        return [c for c in calls if isinstance(c, dict) and isinstance(c.get("name"), str)]

    def _emit(self, calls: list[dict[str, Any]]) -> list[ToolCallDelta]:
        deltas = []
        for call in calls[self._in_section :]:
            if self.satisfied:
                break
            arguments = call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            call_id = call.get("id") if isinstance(call.get("id"), str) else None
            deltas.append(
                ToolCallDelta(index=self.count, id=call_id or new_call_id(), name=call["name"], arguments=arguments)
            )
            self.count += 1
            self._in_section += 1
        return deltas
