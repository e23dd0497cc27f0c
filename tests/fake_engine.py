"""A deterministic stand-in for the engine, for HTTP and load tests (no MLX).

Every word of the prompt becomes one token. A reply echoes the words of the last message, one
token per step, then stops as if it had produced EOS; `ignore_eos` keeps cycling through them
until `max_tokens`. Stop strings, `finish_reason` and usage follow the `StreamDelta` contract.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from server.engine.types import EngineError, SamplingParams, StreamDelta, TokenLogprob, fit_to_context


class FakeEngine:
    """EngineClient whose output is the last message's words, `token_delay` seconds apart.

    Records what it saw so tests can assert on it: `requests` (request_id, prompt_ids, params),
    `cancelled` (request ids closed before their last delta), `finished` (ids that ran to the end).
    `fail_after=k` makes every generation raise EngineError after k deltas (0: before the first).
    """

    def __init__(
        self,
        *,
        model_name: str = "fake-model",
        max_model_len: int = 4096,
        token_delay: float = 0.0,
        fail_after: int | None = None,
    ) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.token_delay = token_delay
        self.fail_after = fail_after
        self.requests: list[tuple[str, list[int], SamplingParams]] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.is_shut_down = False
        self.aborted: list[str] = []
        self._vocab: dict[str, int] = {}
        self._words: list[str] = []
        self._running = 0

    # Tokens are words; ids are handed out in order of first appearance.
    def _token_id(self, word: str) -> int:
        if word not in self._vocab:
            self._vocab[word] = len(self._words)
            self._words.append(word)
        return self._vocab[word]

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        """One role-marker token per message, then one token per word of its content."""
        ids: list[int] = []
        for message in messages:
            ids.append(self._token_id(f"<{message['role']}>"))
            ids.extend(self._token_id(w) for w in str(message.get("content") or "").split())
        return ids

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[StreamDelta]:
        self.requests.append((request_id, list(prompt_ids), params))
        if self.is_shut_down:
            raise EngineError("the engine is shutting down")
        params = fit_to_context(params, len(prompt_ids), self.max_model_len)
        self.requests[-1] = (request_id, list(prompt_ids), params)  # as the engine would run it
        reply = self._reply_words(prompt_ids)
        emitted = ""  # text already sent, a prefix of `text`
        text = ""
        done = False
        self._running += 1
        try:
            for step in range(params.max_tokens):
                if self.fail_after is not None and step >= self.fail_after:
                    raise EngineError("the fake engine failed on purpose")
                await asyncio.sleep(self.token_delay)
                if self.is_shut_down:
                    raise EngineError("the engine is shutting down")
                ids: list[int] = []
                finish = None
                if not reply or (step >= len(reply) and not params.ignore_eos):
                    finish = "stop"  # EOS, which adds no text
                else:
                    word = reply[step % len(reply)]
                    ids = [self._token_id(word)]
                    text += f" {word}" if step else word
                    if step + 1 == params.max_tokens:
                        finish = "length"
                cut = _stop_at(text, params.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                safe = len(text) if finish else len(text) - _held_back(text, params.stop)
                delta_text, emitted = text[len(emitted) : safe], text[:safe]
                yield StreamDelta(
                    text=delta_text,
                    token_ids=ids,
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=step + 1,
                    finish_reason=finish,
                    logprobs=self._logprobs(ids, params),
                )
                if finish:
                    done = True
                    self.finished.append(request_id)
                    return
        finally:
            self._running -= 1
            if not done:
                self.cancelled.append(request_id)

    def _reply_words(self, prompt_ids: list[int]) -> list[str]:
        """The words after the last role marker of the prompt."""
        words = [self._words[i] for i in prompt_ids]
        markers = [i for i, w in enumerate(words) if w.startswith("<") and w.endswith(">")]
        return words[markers[-1] + 1 :] if markers else words

    def _logprobs(self, ids: list[int], params: SamplingParams) -> list[TokenLogprob] | None:
        if not params.logprobs:
            return None
        return [
            TokenLogprob(
                token=self._words[i],
                logprob=-0.5,
                top=[(self._words[i], -0.5)] + [(f"alt{k}", -1.0 - k) for k in range(params.top_logprobs - 1)],
            )
            for i in ids
        ]

    def stats(self) -> dict:
        return {"running": self._running, "waiting": 0, "cache_usage": 0.0}

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        """Ends every live generation with EngineError at its next step; idempotent."""
        self.is_shut_down = True


def _stop_at(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    return max(
        (n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])),
        default=0,
    )
