"""/v1/responses on the wire: the request (input items, tools, text format and the hints Codex
sends), the response object and its output items, and the stream's events.

A request maps itself to the engine's request as chat's does: its items to chat-template messages
(`input_messages`), its function tools to `ToolSpec`s, its tool choice and text format to an
`OutputConstraint` (the shared `output_constraint`), its sampling fields to `SamplingParams`.
Fields that would change the answer and that the server cannot honour are refused here (400),
each with the reason in its message; docs/api-openai-responses.md lists every field.
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from server.api.protocol import (
    FunctionDefinition,
    StrictRequest,
    output_constraint,
    template_tool_call,
    with_given,
)
from server.engine.types import OutputConstraint, SamplingParams, ToolSpec

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
TEXT_PARTS = '{"type": "input_text" | "output_text", "text": ...} parts (images, files and audio are not supported)'


class TextContent(StrictRequest):
    type: Literal["input_text", "output_text"]
    text: str


def _text_content(content: object, handler: ValidatorFunctionWrapHandler) -> str | list[TextContent]:
    # One clear message instead of one per member of the union.
    try:
        checked: str | list[TextContent] = handler(content)
    except ValidationError:
        raise ValueError(f"must be a string or a list of {TEXT_PARTS}") from None
    return checked


def _joined(content: str | list[TextContent]) -> str:
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


class MessageItem(StrictRequest):
    """A message; `id`, `status` and `phase` (sent back by clients) are ignored."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextContent]

    _content_shape = field_validator("content", mode="wrap")(_text_content)


class FunctionCallItem(StrictRequest):
    """A call the model made earlier, sent back with the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(StrictRequest):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextContent]

    _output_shape = field_validator("output", mode="wrap")(_text_content)


class ReasoningItem(StrictRequest):
    """A reasoning item Codex replays. This server never emits one, so a replayed one came from
    another model; its summary is not part of the conversation this model sees."""

    type: Literal["reasoning"]


def _item_type(item: object) -> str | None:
    # EasyInputMessage ({"role", "content"}) has no type.
    if isinstance(item, dict):
        kind = item.get("type", "message")
        return kind if isinstance(kind, str) else None
    return getattr(item, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(
        _item_type,
        custom_error_type="unsupported_item",
        custom_error_message="supported items: message, function_call, function_call_output, reasoning",
    ),
]


class FunctionTool(FunctionDefinition):
    """A function the model may call, flattened as the Responses API sends it."""

    type: Literal["function"]

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, parameters: object) -> object:
        # The Responses API allows null: a function without arguments.
        return {"type": "object", "properties": {}} if parameters is None else parameters


class UnofferedTool(StrictRequest):
    """Tools Codex sends by default that this server cannot run: accepted so that Codex works, and
    not offered to the model (web_search runs at OpenAI; a namespace groups Codex's sub-agent
    functions, whose calls would have to come back under the namespace)."""

    type: Literal["namespace", "web_search"]
    name: str | None = None


Tool = Annotated[
    Annotated[FunctionTool, Tag("function")]
    | Annotated[UnofferedTool, Tag("namespace")]
    | Annotated[UnofferedTool, Tag("web_search")],
    Discriminator(
        lambda tool: tool.get("type") if isinstance(tool, dict) else getattr(tool, "type", None),
        custom_error_type="unsupported_tool",
        custom_error_message=(
            "only function tools are offered to the model (namespace and web_search, which Codex sends, "
            "are accepted and not offered)"
        ),
    ),
]


class NamedFunction(StrictRequest):
    type: Literal["function"]
    name: str


class TextFormat(StrictRequest):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_when_json_schema(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("format: a json_schema format needs a name and a schema")
        return self


class TextConfig(StrictRequest):
    format: TextFormat | None = None
    verbosity: None = None

    @field_validator("verbosity", mode="wrap")
    @classmethod
    def _no_verbosity(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        return _unsupported(value, handler, "the model has no verbosity setting")


class Reasoning(StrictRequest):
    """Codex sends {"summary": "auto"}; the model does not reason, so there is nothing to set or
    summarise (accepted, ignored)."""

    effort: str | None = None
    summary: str | None = None


def _unsupported(value: object, handler: ValidatorFunctionWrapHandler, why: str) -> object:
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"not supported by this server: {why}") from None


class ResponseRequest(StrictRequest):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[Tool] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction = "auto"
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None  # not OpenAI's: as chat's seed (send it in the SDK's extra_body)
    store: bool = True
    stream: bool | None = None
    metadata: dict[str, str] | None = None
    reasoning: Reasoning | None = None
    # Asks for reasoning items' encrypted content: there are none.
    include: list[Literal["reasoning.encrypted_content"]] | None = None
    # Fields that would change the answer and that this server cannot honour.
    background: Literal[False] | None = None
    truncation: Literal["disabled"] | None = None
    conversation: None = None
    prompt: None = None
    max_tool_calls: None = None
    top_logprobs: Literal[0] | None = None

    @field_validator(
        "background", "truncation", "conversation", "prompt", "max_tool_calls", "top_logprobs", mode="wrap"
    )
    @classmethod
    def _refused(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        return _unsupported(value, handler, "see docs/api-openai-responses.md")

    @field_validator("input", mode="wrap")
    @classmethod
    def _input_shape(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        # The error of the branch the value took (a list: its items'), not one per member of the union.
        try:
            return handler(value)
        except ValidationError as exc:
            if not isinstance(value, list):
                raise ValueError("must be a string or a list of items") from None
            first = next(e for e in exc.errors() if e["loc"][0] != "str")
            where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"][1:])
            raise ValueError(f"{where.lstrip('.')}: {first['msg'].removeprefix('Value error, ')}") from None

    @field_validator("include", mode="wrap")
    @classmethod
    def _includes(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        return _unsupported(value, handler, 'only "reasoning.encrypted_content" (which adds nothing) is accepted')

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _tool_choice_shape(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError('must be "none", "auto", "required" or {"type": "function", "name": ...}') from None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ResponseRequest:
        names = [tool.name for tool in self.tool_specs]
        if self.tool_choice not in ("none", "auto") and not names:
            raise ValueError("tool_choice: needs function tools")
        if isinstance(self.tool_choice, NamedFunction) and self.tool_choice.name not in names:
            raise ValueError(f"tool_choice: no function named {self.tool_choice.name!r} among the tools")
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        return self

    @cached_property
    def tool_specs(self) -> list[ToolSpec]:
        """The function tools as the engine takes them (the others are not offered)."""
        return [tool.spec() for tool in self.tools if isinstance(tool, FunctionTool)]

    def input_messages(self) -> list[dict[str, Any]]:
        """The input items as chat-template messages: calls join the assistant message before
        them (as the model wrote them: text, then calls), outputs become tool messages."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        messages: list[dict[str, Any]] = []
        for item in self.input:
            if isinstance(item, MessageItem):
                role = "system" if item.role == "developer" else item.role
                messages.append({"role": role, "content": _joined(item.content)})
            elif isinstance(item, FunctionCallItem):
                call = template_tool_call(item.call_id, item.name, item.arguments)
                if not messages or messages[-1]["role"] != "assistant":
                    messages.append({"role": "assistant", "content": ""})
                messages[-1].setdefault("tool_calls", []).append(call)
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _joined(item.output)})
        return messages

    def constraint(self) -> OutputConstraint | None:
        fmt = self.text.format if self.text else None
        choice = self.tool_choice.name if isinstance(self.tool_choice, NamedFunction) else self.tool_choice
        schema = fmt.schema_ if fmt and fmt.type == "json_schema" else None
        return output_constraint(
            self.tool_specs, choice, self.parallel_tool_calls, schema, bool(fmt and fmt.type == "json_object")
        )

    def echo(self) -> dict[str, Any]:
        """What a response repeats of its request."""
        fmt = self.text.format if self.text else None
        choice = self.tool_choice
        return {
            "instructions": self.instructions,
            "previous_response_id": self.previous_response_id,
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
            "tools": [tool.model_dump(exclude_none=True, by_alias=True) for tool in self.tools],
            "text": {"format": fmt.model_dump(exclude_none=True, by_alias=True) if fmt else {"type": "text"}},
            "reasoning": self.reasoning.model_dump() if self.reasoning else None,
            "store": self.store,
            "metadata": self.metadata or {},
        }

    def to_sampling_params(self) -> SamplingParams:
        """The engine's view; fields left out keep the engine's defaults, an unset
        max_output_tokens is fitted to the context (`fit_to_context`)."""
        params = SamplingParams(max_tokens=self.max_output_tokens, constraint=self.constraint())
        return with_given(params, temperature=self.temperature, top_p=self.top_p, seed=self.seed)


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCallOut(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputMessage | FunctionCallOut


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseError(BaseModel):
    code: str  # OpenAI's: "server_error", "rate_limit_exceeded", ...
    message: str


class ResponseObject(BaseModel):
    """A response: as returned whole, in the stream's lifecycle events, and by GET."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    instructions: str | None
    previous_response_id: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    parallel_tool_calls: bool
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    text: dict[str, Any]
    reasoning: dict[str, Any] | None
    store: bool
    metadata: dict[str, str]
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: Literal[True] = True
