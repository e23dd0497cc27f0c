"""Plain data that crosses the boundary between the engine and its callers.

Nothing here imports MLX or HTTP code: the API layer builds `SamplingParams`, the engine
streams `StreamDelta`s back; offline callers (warm-up, benchmarks, evaluation, tests) collect
them as `RequestOutput`s (`LLMEngine.generate`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol


@dataclass(frozen=True)
class ToolSpec:
    """One function a request offers the model (OpenAI's `tools[i].function`)."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)  # a JSON schema of the arguments
    description: str | None = None
    strict: bool = False

    def template(self) -> dict[str, Any]:
        """The tool as chat templates take it: OpenAI's {"type": "function", "function": {...}},
        whichever API the request came through."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class OutputConstraint:
    """What the model's output must be, enforced while decoding by a token mask.

    `json_schema` (response_format json_schema) or `json_object` (any JSON object); with `tools`
    and `tool_choice` "required" or a tool's name, the output must be a call (or calls, when
    `parallel_tool_calls`) of the offered tools in the model's own tool-call syntax, with
    arguments that validate against the tool's schema. With `tokens`, the output is exactly those
    token ids, whatever the rest says (scoring a given text: server/eval/perplexity.py).
    """

    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "auto"  # "none" | "auto" | "required" | the name of one of `tools`
    parallel_tool_calls: bool = True
    tokens: tuple[int, ...] = ()


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: as many as the context leaves (see `fit_to_context`)
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
    # The request's tools and output format; None: free text.
    constraint: OutputConstraint | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)
    # The token's own bytes (a token may hold part of a UTF-8 character, which `token` shows as
    # U+FFFD); None: `token` encoded as UTF-8.
    bytes: list[int] | None = None


@dataclass
class ToolCallDelta:
    """A piece of the `index`-th tool call of a reply, as OpenAI streams it: the first piece of a
    call carries its `id` and `name`, later ones only `arguments` fragments (JSON text)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamDelta:
    """Text and tokens produced since the previous delta of the same request.

    `finish_reason` is None until the last delta: "stop" (EOS or a stop string, then named in
    `stop_sequence`), "length", or "tool_calls" (the reply ended with tool calls). `text` never
    contains a stop string, a partial multi-byte character, or tool-call syntax (calls come as
    `tool_calls`).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCallDelta] | None = None
    stop_sequence: str | None = None


# Where the engine hands a request's deltas, and the error that ends it instead (if one does).
Emit = Callable[[StreamDelta | Exception], None]


@dataclass
class RequestOutput:
    """One request's output as it streams in: an `Emit` (`LLMEngine.add_request`), and what
    `LLMEngine.generate` returns. `error` is what ended it instead of a finish reason: a refusal,
    an abort, a failed step."""

    request_id: str
    deltas: list[StreamDelta] = field(default_factory=list)
    error: Exception | None = None

    def __call__(self, item: StreamDelta | Exception) -> None:
        assert not self.finished, f"request {self.request_id!r} emitted after its end"
        if isinstance(item, Exception):
            self.error = item
        else:
            self.deltas.append(item)

    @property
    def finished(self) -> bool:
        return self.error is not None or self.finish_reason is not None

    @property
    def finish_reason(self) -> str | None:
        return self.deltas[-1].finish_reason if self.deltas else None

    @property
    def token_ids(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """One entry per output token but an EOS that ended it, where the request asked for `logprobs`."""
        return [lp for d in self.deltas for lp in d.logprobs or []]

    @property
    def prompt_tokens(self) -> int:
        return self.deltas[-1].prompt_tokens if self.deltas else 0

    @property
    def completion_tokens(self) -> int:
        return self.deltas[-1].completion_tokens if self.deltas else 0

    @property
    def cached_tokens(self) -> int:
        return self.deltas[-1].cached_tokens if self.deltas else 0


class EngineError(Exception):
    """A request the engine could not serve; the message is safe to show a client.

    `param` names the request field at fault, where there is one. server/api/errors.py maps each
    kind to its HTTP status and OpenAI error type.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequest(EngineError):
    """The request itself is wrong (the client's fault, a 400)."""


class PromptTooLong(InvalidRequest):
    """Prompt, or prompt plus the requested completion, beyond the model's context."""

    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param)


class EngineShutdown(EngineError):
    """The engine is stopping (or stopped) and ends or refuses the request."""


class RequestTimeout(EngineError):
    """The request ran past the engine's request timeout."""


class EngineOverloaded(EngineError):
    """Running and waiting requests are at their limit; the client should retry later."""


def fit_to_context(
    params: SamplingParams, prompt_len: int, max_model_len: int, default_max_tokens: int | None = None
) -> SamplingParams:
    """`params` with `max_tokens` resolved against the context: the one place this is decided.

    Raises PromptTooLong when the prompt leaves no room, or when an explicit `max_tokens` would not
    fit; an unset `max_tokens` becomes `default_max_tokens`, or what the context leaves if less.
    """
    room = max_model_len - prompt_len
    if room <= 0:
        raise PromptTooLong(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens. Please shorten the prompt."
        )
    if params.max_tokens is not None and params.max_tokens > room:
        raise PromptTooLong(
            f"This model's maximum context length is {max_model_len} tokens; the prompt uses "
            f"{prompt_len} and {params.max_tokens} more were requested. Lower max_tokens to at most {room}.",
            param="max_tokens",
        )
    return replace(params, max_tokens=params.max_tokens or min(room, default_max_tokens or room))


class EngineClient(Protocol):
    """What the serving layer needs from an engine (real or fake)."""

    model_name: str
    max_model_len: int

    async def encode_chat(self, messages: list[dict[str, Any]], tools: list[ToolSpec] | None = None) -> list[int]:
        """Apply the model's chat template (with the tool definitions, when given) and tokenize,
        off the event loop, ready for generation. `messages` are chat-template dicts: role,
        content, and for assistant messages `tool_calls` ([{"id", "type": "function",
        "function": {"name", "arguments"}}]), for tool messages `tool_call_id`."""
        ...

    async def encode_text(self, text: str) -> list[int]:
        """Tokenize a plain prompt (/v1/completions) as the model's tokenizer does, off the event loop."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """Text of token ids (a completion's echoed token prompt)."""
        ...

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[StreamDelta, None]:
        """Stream deltas. A refusal (EngineError) is raised at the first `anext`; closing the
        generator early (`aclose()`) aborts the request and frees its cache."""
        ...

    def abort(self, request_id: str) -> None:
        """End a request wherever it is; its generator then stops. Unknown ids are ignored."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for /health and metrics: running, waiting, cache usage."""
        ...

    def shutdown(self) -> None:
        """End every live generation with EngineShutdown and stop; idempotent, safe from any thread."""
        ...
