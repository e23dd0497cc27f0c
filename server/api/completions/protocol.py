"""/v1/completions on the wire: prompts as text or token ids; `text_completion` replies."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import (
    BaseModel,
    Field,
    field_validator,
)

from server.api.protocol import GenerationRequest, Usage


class CompletionRequest(GenerationRequest):
    """/v1/completions: a prompt as text, a list of texts, token ids, or a list of those."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    # Refused unless empty and 1, which the document states (the validators word the refusal).
    suffix: str | None = Field(default=None, max_length=0)
    best_of: int | None = Field(default=None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _some_prompt(
        cls, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("must not be empty")
        if isinstance(prompt, list) and any(isinstance(t, int) and t < 0 for t in prompt):
            raise ValueError("token ids must be >= 0")
        return prompt

    @field_validator("suffix", mode="before")
    @classmethod
    def _no_suffix(cls, suffix: object) -> object:
        if isinstance(suffix, str) and suffix:
            raise ValueError("suffix (insertion) is not supported by this server")
        return suffix

    @field_validator("best_of", mode="before")
    @classmethod
    def _no_best_of(cls, best_of: object) -> object:
        if isinstance(best_of, int) and not isinstance(best_of, bool) and best_of != 1:
            raise ValueError("best_of is not supported by this server; use n")
        return best_of

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request, as text or as token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [[x for x in p if isinstance(x, int)]]
        return [x for x in p if isinstance(x, str | list)]

    def wants_logprobs(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    """A /v1/completions answer; each streamed event has the same shape, usage on the last."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
