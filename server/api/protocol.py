"""What every OpenAI-shaped endpoint shares on the wire: strict request validation, the sampling
fields of chat and text completions, function tools and the constraint they make, assistant tool
calls in the chat template's form, usage, model cards, health and the error body.

Requests are strict about types (a string where a number belongs is a 400, not a guess) and
ignore unknown fields, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from server.engine.types import OutputConstraint, SamplingParams, ToolSpec


class StrictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: object) -> object:
        # JSON's "\ud800" escapes decode to lone surrogates, which no tokenizer or encoder takes.
        if _has_lone_surrogate(value):
            raise ValueError("contains a lone UTF-16 surrogate, which is not valid Unicode text")
        return value


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False  # numbers, None, and nested requests (checked by their own validator)


class FunctionDefinition(StrictRequest):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.parameters, self.description, bool(self.strict))


def output_constraint(
    tools: Sequence[ToolSpec],
    tool_choice: str,
    parallel_tool_calls: bool | None,
    json_schema: dict[str, Any] | None = None,
    json_object: bool = False,
) -> OutputConstraint | None:
    """What a request's tools and output format ask of the decoder (None: free text).
    `tool_choice` is "none", "auto", "required" or a tool's name; parallel calls unless refused."""
    if not tools and json_schema is None and not json_object:
        return None
    return OutputConstraint(
        json_schema=json_schema,
        json_object=json_object,
        tools=tuple(tools),
        tool_choice=tool_choice if tools else "none",
        parallel_tool_calls=parallel_tool_calls is not False,
    )


def template_tool_call(call_id: str, name: str, arguments: str | dict[str, Any]) -> dict[str, Any]:
    """An assistant's tool call as chat templates take it (OpenAI's shape), whichever API the
    conversation came through: arguments as an object (templates serialize them), parsed when
    they came as JSON text, else as the text the client sent."""
    parsed: object = arguments
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            parsed = json.loads(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": parsed}}


class JsonSchemaFormat(StrictRequest):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] = Field(alias="schema", default_factory=dict)
    strict: bool | None = None


class StreamOptions(StrictRequest):
    include_usage: bool = False


class GenerationRequest(StrictRequest):
    """The fields chat and text completions share: model, sampling, stop, n, streaming."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: disabled (vLLM's convention)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None  # normalized to a list by validation
    seed: int | None = None
    n: int = Field(default=1, ge=1)  # the server's --max-n bounds it (serving.py)
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop_strings(cls, stop: object, handler: ValidatorFunctionWrapHandler) -> list[str]:
        try:
            checked: str | list[str] | None = handler(stop)
        except ValidationError:
            raise ValueError("must be a string or a list of strings") from None
        strings = [checked] if isinstance(checked, str) else list(checked or [])
        if len(strings) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in strings):
            raise ValueError("stop sequences must be non-empty")
        return strings

    @field_validator("logit_bias")
    @classmethod
    def _token_id_biases(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not (token.isascii() and token.isdigit()):
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value}")
        return bias

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def wants_logprobs(self) -> tuple[bool, int]:
        """(whether to return logprobs, how many alternatives per token)."""
        return False, 0

    def constraint(self) -> OutputConstraint | None:
        return None

    def to_sampling_params(self) -> SamplingParams:
        """The engine's view of this request; `max_tokens` stays unset when the client sent none
        (the engine fits it to the context: `fit_to_context`). Fields the client left out keep
        the engine's defaults."""
        logprobs, top_logprobs = self.wants_logprobs()
        params = SamplingParams(
            max_tokens=self.requested_max_tokens(),
            stop=list(self.stop or []),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            logit_bias={int(token): bias for token, bias in (self.logit_bias or {}).items()},
            constraint=self.constraint(),
        )
        return with_given(
            params,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0) if self.top_k is not None else None,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
        )


def with_given(params: SamplingParams, **given: Any) -> SamplingParams:
    """`params` with the fields a client sent; those it left out (None) keep the engine's defaults."""
    return replace(params, **{name: value for name, value in given.items() if value is not None})


@dataclass(frozen=True)
class TokenCounts:
    """A request's token counts, which each API words as its own usage object."""

    prompt: int
    completion: int
    cached: int  # prompt tokens served from the prefix cache


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, counts: TokenCounts) -> Usage:
        return cls(
            prompt_tokens=counts.prompt,
            completion_tokens=counts.completion,
            total_tokens=counts.prompt + counts.completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=counts.cached),
        )


def without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if value is not None}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mla-server"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthStatus(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    engine: dict[str, Any]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server sends, whatever its status."""

    error: ErrorInfo
