"""Streaming detokenization of one sequence: token ids in, safe text deltas out.

Text is decoded over a short sliding window of recent tokens (prefix / read offsets, as TGI and
vLLM do): the window's text minus the text of its already-read head is what the newest tokens
added. Decoding a window rather than single tokens keeps SentencePiece's leading spaces and
byte-level BPE's multi-token characters right, and keeps the cost per token independent of the
output length.

Two things are held back: the tail of an incomplete UTF-8 sequence (decoded as U+FFFD until its
last byte arrives) and the longest tail that could still grow into a stop string.
"""

from __future__ import annotations

from typing import Any

from ..types import SamplingParams, ToolCallDelta
from .tool_calls import ToolCallStream, held_tail

_INCOMPLETE = "\ufffd"
# Prompt tokens decoded ahead of the output, so the first output token is decoded in context
# (e.g. keeps its SentencePiece leading space when it continues the prompt's text).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """tokenizer: a Hugging Face tokenizer or mlx-lm's TokenizerWrapper around one."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int] | None,
        stop: list[str],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = stop  # non-empty strings: the API layer's validation guarantees it
        self._stop_hit: str | None = None  # the stop string that ended the text
        self._pending = ""  # released text that may be the start of a stop string

        context = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        if self._decode(context).endswith(_INCOMPLETE):
            context = []  # a prompt cut mid-character would shift the text offsets below
        self._ids = context
        self._prefix = 0  # window start (token index)
        self._read = len(context)  # tokens before this were already turned into text
        self._prefix_len = len(self._decode(context))
        self._released = 0  # chars of the window's new text already passed on

    @property
    def stopped(self) -> bool:
        """A stop string was completed; nothing from it onwards is ever emitted."""
        return self._stop_hit is not None

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that was completed (the first in the text, if several were)."""
        return self._stop_hit

    def add(self, token_id: int) -> str:
        """Append one token; return the text that is now safe to emit (may be "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        new = self._window_text()
        if new.endswith(_INCOMPLETE):
            # Pass on the complete characters; the window stays until the sequence completes.
            ready = new.rstrip(_INCOMPLETE)
            text = ready[self._released :]
            self._released = max(self._released, len(ready))
        else:
            text = new[self._released :]
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_len = len(self._decode(self._ids[self._prefix : self._read]))
            self._released = 0
        return self._filter_stop(text)

    def finish(self) -> str:
        """Flush everything held back; call once when the sequence ends without a stop string."""
        if self.stopped:
            return ""
        new = self._window_text()
        text = self._filter_stop(new[self._released :])
        self._released = len(new)
        if not self.stopped:
            text += self._pending
        self._pending = ""
        return text

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of tokenization spaces: it rewrites text across token boundaries
        # (" ," -> ","), so a streamed space could be taken back later.
        text: str = self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )
        return text

    def _window_text(self) -> str:
        """Text the tokens after the read offset add to the window."""
        return self._decode(self._ids[self._prefix :])[self._prefix_len :]

    def _filter_stop(self, text: str) -> str:
        """Cut at the first completed stop string; hold back a tail that may begin one."""
        if not self._stop or not text:
            return text
        buf = self._pending + text
        hits = [(i, s) for s in self._stop if (i := buf.find(s)) >= 0]
        if hits:
            at, self._stop_hit = min(hits)
            self._pending = ""
            return buf[:at]
        hold = held_tail(buf, self._stop)
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]


class TokenStream:
    """When one sequence's output ends, and the text and tool calls each new token releases.

    The one owner of a request's end: EOS (unless `ignore_eos`), a completed stop string, a
    completed grammar (`add(..., complete=True)`, see constraints.py), or `max_tokens` (already
    fitted to the context, see `types.fit_to_context`). The engine and the tests' fake engine
    both stream through it.

    When the request offers tools (and tool_choice is not "none") and the tokenizer has a tool
    parser, the model's tool-call syntax is cut out of the text and comes out as `ToolCallDelta`
    pieces (`pop_tool_calls`; Mistral's arguments stream as they are generated, see tool_calls.py).
    A reply that began calls and ended by itself ends with "tool_calls"; one cut by `max_tokens`
    ends with "length", its last call as far as it got.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], params: SamplingParams, eos_ids: set[int]) -> None:
        if params.max_tokens is None:
            raise ValueError("max_tokens must be fitted to the context first (types.fit_to_context)")
        self._tokenizer = tokenizer
        self._stop = params.stop
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params.stop)
        self._eos_ids = set() if params.ignore_eos else eos_ids
        self._max_tokens = params.max_tokens
        self.num_tokens = 0
        self._tools: ToolCallStream | None = None
        c = params.constraint
        if c is not None and c.tools and c.tool_choice != "none" and getattr(tokenizer, "tool_parser", None):
            self._tools = ToolCallStream(tokenizer, c.parallel_tool_calls)
        self._calls: list[ToolCallDelta] = []
        self._ids: list[int] = []  # output so far, for a detokenizer restarted after a tool section

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the output, if one did."""
        return self._detokenizer.stop_sequence

    def pop_tool_calls(self) -> list[ToolCallDelta] | None:
        """Tool-call pieces released since the last call, or None."""
        calls, self._calls = self._calls, []
        return calls or None

    def add(self, token_id: int, complete: bool = False) -> tuple[str, str | None]:
        """(text now safe to emit, finish_reason or None) after the sequence's next token.

        complete: the output's grammar admits nothing more, so the output ends with this token.
        """
        self.num_tokens += 1
        self._ids.append(token_id)
        if token_id in self._eos_ids:
            return self._end("stop")
        text = ""
        kind = "content"
        if self._tools is not None:
            kind, calls = self._tools.feed(token_id)
            self._calls += calls
            if kind == "start":
                text = self._detokenizer.finish() + self._tools.take_leftover()
            elif kind == "end":  # content may follow a closed section
                text = self._tools.take_leftover()
                self._detokenizer = IncrementalDetokenizer(self._tokenizer, self._ids, self._stop)
        if kind == "content":
            text = self._detokenizer.add(token_id)
            if self._detokenizer.stopped:
                return text, "stop"
        if complete or (self._tools is not None and self._tools.satisfied):
            return self._end("stop", text)
        if self.num_tokens >= self._max_tokens:
            return self._end("length", text)
        return text, None

    def _end(self, reason: str, text: str = "") -> tuple[str, str | None]:
        if self._tools is not None and self._tools.active:
            calls, leftover = self._tools.close()
            self._calls += calls
            text += leftover
        else:
            text += self._detokenizer.finish()
        if reason == "stop" and self._tools is not None and self._tools.count:
            reason = "tool_calls"
        return text, reason
