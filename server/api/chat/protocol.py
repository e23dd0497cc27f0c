"""/v1/chat/completions on the wire: messages, tools, response formats; the reply and its chunks."""

from __future__ import annotations

import json
import time
from functools import cached_property
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from server.api.protocol import (
    FunctionDefinition,
    GenerationRequest,
    JsonSchemaFormat,
    StrictRequest,
    Usage,
    template_tool_call,
    without_none,
)
from server.engine.types import OutputConstraint, ToolSpec


class TextPart(StrictRequest):
    type: Literal["text"]
    text: str


class FunctionCall(StrictRequest):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(StrictRequest):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


# What `ChatMessage._fields_of_the_role` checks, stated in the OpenAPI document: every role but
# assistant needs content, assistant needs content or tool_calls, only assistant carries tool
# calls, a tool message names the call it answers.
_ROLE_RULES: dict[str, Any] = {
    "allOf": [
        {
            "if": {"properties": {"role": {"enum": ["system", "developer", "user", "tool"]}}},
            "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        },
        {
            "if": {"properties": {"role": {"const": "assistant"}}},
            "then": {
                "anyOf": [
                    {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                    {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array"}}},
                ]
            },
        },
        {
            "if": {"properties": {"role": {"not": {"const": "assistant"}}}},
            "then": {"not": {"required": ["tool_calls"]}},
        },
        {
            "if": {"properties": {"role": {"const": "tool"}}},
            "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}},
        },
    ]
}


class ChatMessage(StrictRequest):
    model_config = ConfigDict(json_schema_extra=_ROLE_RULES)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages

    @field_validator("content", mode="wrap")
    @classmethod
    def _content_shape(cls, content: object, handler: ValidatorFunctionWrapHandler) -> str | list[TextPart] | None:
        # One clear message instead of one per member of the union.
        try:
            checked: str | list[TextPart] | None = handler(content)
            return checked
        except ValidationError:
            raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts') from None

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant"):
            raise ValueError(f"content: a {self.role} message needs content")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("content: an assistant message needs content or tool_calls")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages carry tool calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: a tool message must name the call it answers")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)  # as vLLM joins them
        return self.content or ""

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates take it: plain-string content; "developer" is OpenAI's
        newer name for system; tool-call arguments as objects (templates serialize them)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [
                template_tool_call(c.id, c.function.name, _json_or_text(c.function.arguments)) for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _json_or_text(arguments: str) -> object:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class Tool(StrictRequest):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictRequest):
    name: str


class NamedToolChoice(StrictRequest):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(StrictRequest):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema: required when type is json_schema")
        return self


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise ValueError("tool_choice: only allowed when tools are given")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool named {self.tool_choice.function.name!r} among the tools")
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def wants_logprobs(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0

    @cached_property
    def tool_specs(self) -> list[ToolSpec]:
        """The request's tools as the engine takes them, converted once per request (the chat
        template and the output constraint both read them)."""
        return [
            ToolSpec(t.function.name, t.function.parameters, t.function.description, bool(t.function.strict))
            for t in self.tools or []
        ]

    def constraint(self) -> OutputConstraint | None:
        fmt = self.response_format
        schema = fmt.json_schema.schema_ if fmt and fmt.type == "json_schema" and fmt.json_schema else None
        json_object = bool(fmt and fmt.type == "json_object")
        choice = self.tool_choice
        tool_choice = choice.function.name if isinstance(choice, NamedToolChoice) else (choice or "auto")
        if not self.tools and schema is None and not json_object:
            return None
        return OutputConstraint(
            json_schema=schema,
            json_object=json_object,
            tools=tuple(self.tool_specs),
            tool_choice=tool_choice if self.tools else "none",
            parallel_tool_calls=self.parallel_tool_calls is not False,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the reply is only tool calls
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _calls_only_when_present(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str = ""


class ToolCallChunk(BaseModel):
    """A piece of a streamed tool call: `id`, `type` and the name come with its first piece."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _only_present(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return without_none(handler(self))


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None

    @model_serializer(mode="wrap")
    def _only_present(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends {"role", "content"} first, {"content"} after, {} with the finish_reason.
        return without_none(handler(self))


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event; the usage chunk has no choices, every other chunk has no usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
