"""/v1/messages (Anthropic's Messages API) on the wire: the request (system, messages of content
blocks, tools, tool_choice, sampling) mapped to the chat template and the engine's request; the
message, its streamed events' payloads, count_tokens and the error body.

What is supported, refused or ignored, and why, is docs/api-anthropic-messages.md. Unknown fields
are ignored (as elsewhere); hints Claude Code sends by default (`cache_control`,
`context_management`, `output_config`, `metadata`) are among them.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_core import from_json

from server.api.protocol import StrictRequest, template_tool_call
from server.engine.types import OutputConstraint, SamplingParams, ToolSpec


class TextBlock(StrictRequest):
    type: Literal["text"]
    text: str


class ToolUseBlock(StrictRequest):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(StrictRequest):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        text = "\n".join(b.text for b in self.content) if isinstance(self.content, list) else self.content
        # Chat templates have no error flag for a tool result; the model reads it in the text.
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(StrictRequest):
    """An earlier reply's thinking, sent back by a client: dropped from the prompt, as Anthropic
    drops the thinking of earlier turns."""

    type: Literal["thinking", "redacted_thinking"]


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]
# The blocks each role may hold.
_ROLE_BLOCKS = {"user": {"text", "tool_result"}, "assistant": {"text", "tool_use", "thinking", "redacted_thinking"}}


class Message(StrictRequest):
    # "system" inside `messages` is not Anthropic's, but Claude Code sends one: it stays where it
    # is, as a system message of the chat template.
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, content: object) -> object:
        # One clear refusal for blocks this server cannot honour (image, document, ...), instead
        # of pydantic's list of the union's members.
        for block in content if isinstance(content, list) else []:
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind not in _ROLE_BLOCKS["user"] | _ROLE_BLOCKS["assistant"]:
                raise ValueError(
                    f"{kind!r} content blocks are not supported: this server takes text, tool_use and tool_result"
                )
        return content

    @model_validator(mode="after")
    def _blocks_of_the_role(self) -> Message:
        allowed = _ROLE_BLOCKS.get(self.role, {"text"})
        for block in self.content if isinstance(self.content, list) else []:
            if block.type not in allowed:
                raise ValueError(f"content: a {self.role} message cannot hold {block.type} blocks")
        return self

    def to_template(self) -> list[dict[str, Any]]:
        """Chat-template messages: text blocks joined (as chat joins text parts), tool_use blocks
        as the assistant's tool_calls, each tool_result as a tool message in its place."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        messages: list[dict[str, Any]] = []
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in self.content:
            if isinstance(block, TextBlock):
                text.append(block.text)
            elif isinstance(block, ToolUseBlock):
                calls.append(template_tool_call(block.id, block.name, block.input))
            elif isinstance(block, ToolResultBlock):
                if text:
                    messages.append({"role": self.role, "content": "\n".join(text)})
                    text = []
                messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
        if self.role == "assistant":
            return [{"role": "assistant", "content": "\n".join(text), **({"tool_calls": calls} if calls else {})}]
        return messages + ([{"role": self.role, "content": "\n".join(text)}] if text or not messages else [])


class Tool(StrictRequest):
    # Anthropic's server tools (web search, code execution, ...) have other types: refused here.
    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(StrictRequest):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # with "tool"
    disable_parallel_tool_use: bool = False


class Thinking(StrictRequest):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None

    @model_validator(mode="after")
    def _no_thinking_asked(self) -> Thinking:
        # "adaptive" lets the model decide whether to think; one that cannot think answers
        # directly, which is what adaptive allows. "enabled" demands thinking: refused.
        if self.type == "enabled":
            raise ValueError('this model does not think; send {"type": "disabled"} or "adaptive", or leave it out')
        return self


class PromptRequest(StrictRequest):
    """What makes the prompt: the fields /v1/messages and /v1/messages/count_tokens share."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> PromptRequest:
        names = [t.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: tool names must be unique")
        choice = self.tool_choice
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            raise ValueError(f"tool_choice: {choice.type!r} needs tools")
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise ValueError(f"tool_choice: no tool named {choice.name!r} among the tools")
        return self

    def template_messages(self) -> list[dict[str, Any]]:
        """The conversation as chat-template messages, the system prompt first."""
        system = self.system if isinstance(self.system, str) else "\n".join(b.text for b in self.system or [])
        head = [{"role": "system", "content": system}] if system else []
        return head + [m for message in self.messages for m in message.to_template()]

    @cached_property
    def tool_specs(self) -> list[ToolSpec]:
        """The tools as the engine takes them, converted once (template and constraint read them)."""
        return [ToolSpec(t.name, t.input_schema, t.description) for t in self.tools or []]


# Anthropic's tool_choice types as the engine's.
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


class MessagesRequest(PromptRequest):
    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = None
    metadata: dict[str, Any] | None = None  # user_id: a hint, ignored
    stream: bool = False

    @field_validator("stop_sequences")
    @classmethod
    def _non_empty(cls, stop: list[str] | None) -> list[str] | None:
        if any(not s for s in stop or []):
            raise ValueError("stop sequences must be non-empty")
        return stop

    def constraint(self) -> OutputConstraint | None:
        if not self.tools:
            return None
        choice = self.tool_choice or ToolChoice(type="auto")
        return OutputConstraint(
            tools=tuple(self.tool_specs),
            tool_choice=choice.name or "" if choice.type == "tool" else _TOOL_CHOICES[choice.type],
            parallel_tool_calls=not choice.disable_parallel_tool_use,
        )

    def to_sampling_params(self, room: int) -> SamplingParams:
        """The engine's request. `max_tokens` is a cap, as Anthropic treats it: clamped to the
        `room` the context leaves after the prompt (Claude Code asks 32000 whatever the model)."""
        params = SamplingParams(
            max_tokens=min(self.max_tokens, room) if room > 0 else self.max_tokens,
            stop=list(self.stop_sequences or []),
            constraint=self.constraint(),
        )
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                setattr(params, name, getattr(self, name))
        return params


class TextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]

    @staticmethod
    def parse_input(arguments: str) -> dict[str, Any]:
        """A call's arguments as an object; a call cut by max_tokens as far as it parses, as the
        SDK reads a streamed input (partial JSON)."""
        try:
            value = from_json(arguments, allow_partial=True)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessagesUsage(BaseModel):
    input_tokens: int  # prompt tokens not read from the cache, as Anthropic counts them
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int = 0  # the prefix cache fills as a side effect, at no cost


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextOut | ToolUseOut]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: MessagesUsage


class CountTokensResponse(BaseModel):
    input_tokens: int


class AnthropicErrorInfo(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Every error the /v1/messages routes send, whatever its status."""

    type: Literal["error"] = "error"
    error: AnthropicErrorInfo
