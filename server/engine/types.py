"""Plain data that crosses the boundary between the serving layer and the engine.

Nothing here imports MLX or HTTP code: the API layer builds `SamplingParams`, the engine
streams `StreamDelta`s back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class StreamDelta:
    """Text and tokens produced since the previous delta of the same request.

    `finish_reason` is None until the last delta: "stop" (EOS or a stop string) or "length".
    `text` never contains a stop string or a partial multi-byte character.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


class EngineError(Exception):
    """A request the engine could not serve; the message is safe to show a client."""


class InvalidRequest(EngineError):
    """The request itself is wrong (the client's fault, a 400)."""


class PromptTooLong(InvalidRequest):
    pass


class EngineClient(Protocol):
    """What the serving layer needs from an engine (real or fake)."""

    model_name: str
    max_model_len: int

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Apply the model's chat template and tokenize, ready for generation."""

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[StreamDelta]:
        """Stream deltas; closing the iterator early cancels the request and frees its cache."""

    def stats(self) -> dict:
        """Counters for /health and metrics: running, waiting, cache usage."""
