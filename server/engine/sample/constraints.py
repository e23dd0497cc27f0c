"""Token masks that hold a sequence's output to a grammar: the owner of structured output.

Built on llguidance (see docs/structured-output.md for why). One `Constraints` per engine holds
the llguidance view of the tokenizer (built on first use: about 0.7 s for a 131K vocabulary) and
a thread pool; each constrained request gets a `TokenConstraint`, which

- fills its row of the batch's bitmask (one bit per token of the model's vocabulary) before the
  step's sampling: `Constraints.fill_masks`, all rows at once on llguidance's threads, while the
  model's forward pass of the same step runs (see `logits_processors`);
- consumes every token the sequence samples (`consume`), and reports when the grammar is
  complete (`done`): no token but EOS could follow, so the sequence ends there.

Grammars come from `OutputConstraint`: a JSON schema (`json_schema`), any JSON object
(`json_object`), or calls of the offered tools in the model's own tool-call syntax
(`tool_choice` "required" or a tool's name; see `tool_calls.ToolSyntax`). `tool_choice` "none"
bans the tool-call start token by a fixed mask. EOS is allowed only where the grammar accepts.
Given `tokens`, each step's mask allows only the next of them: the output is that token sequence.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance as llg
import llguidance.numpy as llg_np
import numpy as np

from ..output.tool_calls import ToolSyntax, tool_syntax
from ..types import InvalidRequest, OutputConstraint, ToolSpec

# Compact JSON with json.dumps' separators: what models write most often, and no room for a
# model to wander through whitespace (a random model would fill max_tokens with newlines).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class TokenConstraint:
    """One sequence's constraint: a grammar matcher, a fixed mask (banned tokens only), or the
    tokens the output must be (`forced`)."""

    def __init__(self, matcher: llg.LLMatcher | None, fixed: np.ndarray | None, forced: tuple[int, ...] = ()) -> None:
        self.matcher = matcher
        self.fixed = fixed  # int32 [W]: the row of a constraint without a grammar
        self.forced = forced
        self.consumed = 0  # tokens consumed so far: with `forced`, the next draw is forced[consumed]

    def consume(self, token_id: int) -> None:
        """Advance past a sampled token (always one the mask allowed)."""
        self.consumed += 1
        if self.matcher is not None and not self.matcher.is_stopped():
            self.matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more, or every forced token is out: the
        output ends here."""
        if self.forced:
            return self.consumed == len(self.forced)
        return self.matcher is not None and (self.matcher.is_stopped() or self.matcher.is_error())


class Constraints:
    """The engine's grammar compiler and mask filler.

    tokenizer: mlx-lm's TokenizerWrapper (or a Hugging Face fast tokenizer); vocab_size: the
    model's (the width of its logits, possibly more than the tokenizer's).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self.words = (vocab_size + 31) // 32
        self._ll: llg.LLTokenizer | None = None
        self._executor: llg.LLExecutor | None = None
        self.syntax: ToolSyntax | None = tool_syntax(tokenizer)
        self._eos_only = self._allowing(self._eos_ids)

    @property
    def ll_tokenizer(self) -> llg.LLTokenizer:
        if self._ll is None:
            hf = getattr(self._tokenizer, "_tokenizer", self._tokenizer)  # unwrap mlx-lm's wrapper
            backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
            if backend is None:
                raise InvalidRequest("structured output needs a fast (tokenizers) tokenizer; this model has none")
            self._ll = llg.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos_ids)
            self._executor = llg.LLExecutor()
        return self._ll

    # -- per request ----------------------------------------------------------------------------
    def build(self, constraint: OutputConstraint | None) -> TokenConstraint | None:
        """The constraint of a request, or None for free text. Raises InvalidRequest (a 400) for
        an invalid schema or tool choice, with llguidance's message."""
        if constraint is None:
            return None
        if constraint.tokens:
            bad = [t for t in constraint.tokens if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequest(f"forced token ids out of range [0, {self.vocab_size}): {bad[:5]}")
            return TokenConstraint(None, None, constraint.tokens)
        lark = self.grammar(constraint)
        if lark is None:
            banned = self.banned(constraint)
            if not banned:
                return None
            row = np.full((self.words,), 0xFFFFFFFF, dtype=np.uint32)
            for t in banned:
                row[t >> 5] &= ~np.uint32(1 << (t & 31))
            return TokenConstraint(None, row.view(np.int32))
        grammar = llg.LLMatcher.grammar_from_lark(lark)
        error = llg.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error:
            raise InvalidRequest(_clean(error), param=_param(constraint))
        matcher = llg.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(_clean(matcher.get_error()), param=_param(constraint))
        return TokenConstraint(matcher, None)

    def grammar(self, c: OutputConstraint) -> str | None:
        """The Lark grammar (llguidance's dialect) of a constraint; None when it needs none."""
        names = {t.name for t in c.tools}
        if c.tool_choice not in ("none", "auto", "required") and c.tool_choice not in names:
            raise InvalidRequest(f"tool_choice names no offered tool: {c.tool_choice!r}", param="tool_choice")
        calls = c.tool_choice != "none" and c.tool_choice != "auto" and bool(c.tools)
        if c.tool_choice == "required" and not c.tools:
            raise InvalidRequest("tool_choice 'required' needs at least one tool", param="tool_choice")
        body = None
        if c.json_schema is not None:
            if not isinstance(c.json_schema, dict):
                raise InvalidRequest("the JSON schema must be an object", param="response_format")
            body = _json_rule(c.json_schema)
        elif c.json_object:
            body = _json_rule({"type": "object"})
        if not calls and body is None:
            return None
        rules = []
        alternatives = []
        if calls or (body is not None and c.tool_choice == "auto" and c.tools):
            tools = [t for t in c.tools if c.tool_choice in ("required", "auto") or t.name == c.tool_choice]
            # A named function is one call of it, as OpenAI's named tool_choice forces.
            parallel = c.parallel_tool_calls and c.tool_choice in ("required", "auto")
            rules += self._tool_rules(tools, parallel)
            alternatives.append("calls")
        if body is not None and not calls:
            rules.append(f"json_body: {body}")
            alternatives.append("json_body")
        return "\n".join([f"start: {' | '.join(alternatives)}", *rules])

    def banned(self, c: OutputConstraint) -> list[int]:
        """Tokens a constraint without a grammar forbids: the tool-call start under "none"."""
        if c.tool_choice == "none" and c.tools and self.syntax is not None:
            return [self.syntax.start_id]
        return []

    def _tool_rules(self, tools: list[ToolSpec], parallel: bool) -> list[str]:
        if self.syntax is None:
            raise InvalidRequest(
                "this model has no tool-call syntax the server can enforce (tool_choice 'required' or a "
                "named function); use tool_choice 'auto'",
                param="tool_choice",
            )
        return self.syntax.lark_rules(tools, parallel, _json_rule)

    # -- per step -------------------------------------------------------------------------------
    def fill_masks(self, constraints: list[TokenConstraint | None]) -> np.ndarray:
        """The step's bitmask, int32 [B, W]: row i allows token t iff bit t of it is set.

        Unconstrained rows allow everything. llguidance computes the grammar rows on its own
        threads without the GIL.
        """
        masks = np.full((len(constraints), self.words), -1, dtype=np.int32)
        jobs = []
        for i, c in enumerate(constraints):
            if c is None:
                continue
            if c.forced:
                masks[i] = self._allowing([c.forced[c.consumed]])
            elif c.fixed is not None:
                masks[i] = c.fixed
            elif c.matcher is not None:
                if c.matcher.is_error():  # cannot happen with masked sampling; end it cleanly
                    masks[i] = self._eos_only
                else:
                    jobs.append((c.matcher, i))
        if jobs:
            self.ll_tokenizer  # noqa: B018 -- makes the executor
            assert self._executor is not None
            llg_np.fill_next_token_bitmask_par(self._executor, jobs, masks)
        return masks

    def _allowing(self, tokens: list[int]) -> np.ndarray:
        """The mask row (int32 [W]) that allows `tokens` and nothing else."""
        row = np.zeros((self.words,), dtype=np.uint32)
        for t in tokens:
            row[t >> 5] |= np.uint32(1 << (t & 31))
        return row.view(np.int32)


def _json_rule(schema: dict[str, Any]) -> str:
    """`%json {...}`: an inline JSON-schema rule with the server's JSON style."""
    options = dict(_JSON_STYLE, **(schema.get("x-guidance") or {}))
    return "%json " + json.dumps(dict(_closed(schema), **{"x-guidance": options}))


def _closed(node: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object lists its `properties`
    and says nothing of others (xgrammar's strict mode does the same). JSON Schema's default would
    let a model invent keys without end, which is never what a client that lists properties wants;
    an explicit `additionalProperties` is kept."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    closed = {key: _closed(value) for key, value in node.items()}
    if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
        closed["additionalProperties"] = False
    return closed


def _param(c: OutputConstraint) -> str:
    return "response_format" if c.json_schema is not None or c.json_object else "tools"


def _clean(error: str) -> str:
    """llguidance's message without the echo of our generated Lark source."""
    first = error.strip().splitlines()[0] if error.strip() else "invalid grammar"
    if "failed to compile JSON schema:" in first:
        first = first.split("failed to compile JSON schema:", 1)[1].strip()
    return f"invalid JSON schema: {first}"
