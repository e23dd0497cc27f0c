"""A deterministic stand-in for the engine, for HTTP and load tests (no MLX).

Every word of the prompt becomes one token (`support.WordTokenizer`). A reply echoes the words of
the last message, one token per step, then samples EOS; `ignore_eos` keeps cycling through them
until `max_tokens`. When the output ends, and the text each token releases (EOS, stop strings,
`max_tokens`), is decided by the engine's own `TokenStream`, so the fake streams exactly as the
engine's stop and detokenizer logic does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from server.engine.output.detokenizer import TokenStream
from server.engine.types import (
    EngineError,
    EngineShutdown,
    SamplingParams,
    StreamDelta,
    TokenLogprob,
    ToolSpec,
    fit_to_context,
)
from support.words import WordTokenizer


class FakeEngine:
    """EngineClient whose output is the last message's words, `token_delay` seconds apart.

    Records what it saw so tests can assert on it: `requests` (request_id, prompt_ids, params as
    fitted to the context), `cancelled` (request ids closed before their last delta), `finished`
    (ids that ran to the end), `aborted` (ids passed to `abort`). `fail_after=k` makes every
    generation raise EngineError after k deltas (0: before the first).
    """

    def __init__(
        self,
        *,
        model_name: str = "fake-model",
        max_model_len: int = 4096,
        token_delay: float = 0.0,
        first_delay: float = 0.0,
        fail_after: int | None = None,
    ) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.token_delay = token_delay
        self.first_delay = first_delay
        self.fail_after = fail_after
        self.tokenizer = WordTokenizer()
        self.requests: list[tuple[str, list[int], SamplingParams]] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.tools_seen: list[list[ToolSpec] | None] = []
        self.is_shut_down = False
        self.failed = False  # as AsyncEngine's: no tensor-parallel rank to fail
        self._running = 0

    async def encode_chat(self, messages: list[dict[str, Any]], tools: list[ToolSpec] | None = None) -> list[int]:
        """One role-marker token per message, then one token per word of its content; tools are
        recorded in `tools_seen`, not templated."""
        self.tools_seen.append(tools)
        ids: list[int] = []
        for message in messages:
            ids.append(self.tokenizer.special_id(f"<{message['role']}>"))
            ids.extend(self.tokenizer.encode(str(message.get("content") or "")))
        return ids

    async def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids))

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[StreamDelta]:
        self.requests.append((request_id, list(prompt_ids), params))
        if self.is_shut_down:
            raise EngineShutdown("the engine is shutting down")
        params = fit_to_context(params, len(prompt_ids), self.max_model_len)
        self.requests[-1] = (request_id, list(prompt_ids), params)  # as the engine would run it
        output = TokenStream(self.tokenizer, prompt_ids, params, self.tokenizer.eos_token_ids)
        reply = self._reply_words(prompt_ids)
        done = False
        self._running += 1
        try:
            for step in range(params.max_tokens or 0):
                if self.fail_after is not None and step >= self.fail_after:
                    raise EngineError("the fake engine failed on purpose")
                await asyncio.sleep(self.token_delay + (self.first_delay if step == 0 else 0.0))
                if self.is_shut_down:
                    raise EngineShutdown("the engine is shutting down")
                token = self._next_token(reply, step, params.ignore_eos)
                text, finish = output.add(token)
                yield StreamDelta(
                    text=text,
                    token_ids=[token],
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=output.num_tokens,
                    finish_reason=finish,
                    logprobs=self._logprobs(token, params),
                    stop_sequence=output.stop_sequence,
                )
                if finish:
                    done = True
                    self.finished.append(request_id)
                    return
        finally:
            self._running -= 1
            if not done:
                self.cancelled.append(request_id)

    def _next_token(self, reply: list[str], step: int, ignore_eos: bool) -> int:
        """The reply's words in turn ("hello", " there", ...), then EOS (or round again)."""
        if not reply or (step >= len(reply) and not ignore_eos):
            return self.tokenizer.eos_token_id
        word = reply[step % len(reply)]
        return self.tokenizer.token_id(f" {word}" if step else word)

    def _reply_words(self, prompt_ids: list[int]) -> list[str]:
        """The words after the last role marker of the prompt."""
        markers = [i for i, t in enumerate(prompt_ids) if t in self.tokenizer.special]
        last = prompt_ids[markers[-1] + 1 :] if markers else prompt_ids
        return [self.tokenizer.piece(t).strip() for t in last]

    def _logprobs(self, token: int, params: SamplingParams) -> list[TokenLogprob] | None:
        if not params.logprobs:
            return None
        word = self.tokenizer.piece(token).strip()
        top = [(word, -0.5)] + [(f"alt{k}", -1.0 - k) for k in range(params.top_logprobs - 1)]
        return [TokenLogprob(token=word, logprob=-0.5, top=top)]

    def stats(self) -> dict[str, Any]:
        return {"running": self._running, "waiting": 0, "cache_usage": 0.0}

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        """Ends every live generation with EngineShutdown at its next step; idempotent."""
        self.is_shut_down = True
