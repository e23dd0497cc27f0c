"""/v1/responses: input items (after the stored conversation of `previous_response_id`) through
the chat template, the one choice back as a response object or as `response.*` events, and the
stored responses behind GET and DELETE /v1/responses/{id}.

Output items: a message when the reply has text or no calls (`msg_<id>`), then one function_call
item per call (`fc_<id>_<k>`), in the order the model wrote them; ids follow from the response's,
so the streamed items are the final ones. Cut by max_output_tokens, the response and its last
item are "incomplete" and the stream ends with `response.incomplete`, as OpenAI's does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request, Response
from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from server.api.errors import APIError
from server.api.generation import ChoiceState, Generation, Service, run
from server.api.metrics import Metrics
from server.api.protocol import TokenCounts, template_tool_call
from server.api.responses.protocol import (
    DeletedResponse,
    FunctionCallOut,
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponseRequest,
    ResponseUsage,
)
from server.api.responses.store import ResponseStore, StoredResponse
from server.api.sse import Framing
from server.engine.types import EngineClient, ToolCallDelta


class ResponsesService(Service):
    """Serves /v1/responses for one engine under its model name, with its store."""

    def __init__(self, engine: EngineClient, metrics: Metrics, store: ResponseStore) -> None:
        super().__init__(engine, metrics, max_n=1)
        self.store = store

    async def create(self, req: ResponseRequest, request: Request) -> Response | ResponseObject:
        timer = self.admit(req.model, 1)
        history = (
            self.stored(req.previous_response_id, "previous_response_id").conversation
            if req.previous_response_id
            else []
        )
        instructions = [{"role": "system", "content": req.instructions}] if req.instructions else []
        conversation = [*history, *req.input_messages()]
        prompt_ids = await self.engine.encode_chat([*instructions, *conversation], req.tool_specs or None)
        reply = _Reply(req, uuid.uuid4().hex, self.engine.model_name)
        start = Generation.start(
            self.engine, reply.id, [prompt_ids], req.to_sampling_params(), 1, timer, bool(req.stream)
        )

        def respond(gen: Generation) -> ResponseObject:
            return self._finish(reply, gen, conversation)

        events = (lambda gen: self._events(reply, gen, conversation)) if req.stream else None
        return await run(request, start, respond, events, Framing(error=reply.failed, done=None))

    def stored(self, response_id: str, param: str | None = None) -> StoredResponse:
        entry = self.store.get(response_id)
        if entry is None:
            code = "previous_response_not_found" if param else None
            raise APIError(404, f"Response with id '{response_id}' not found.", param=param, code=code)
        return entry

    def delete(self, response_id: str) -> DeletedResponse:
        if not self.store.delete(response_id):
            raise APIError(404, f"Response with id '{response_id}' not found.")
        return DeletedResponse(id=response_id)

    def _finish(self, reply: _Reply, gen: Generation, conversation: list[dict[str, Any]]) -> ResponseObject:
        """The whole response; kept in the store (with the conversation it ends) when asked."""
        choice = gen.choices[0]
        response = reply.final(choice, gen.usage())
        if reply.req.store:
            self.store.put(StoredResponse(response, [*conversation, _assistant_message(choice)]))
        return response

    async def _events(
        self, reply: _Reply, gen: Generation, conversation: list[dict[str, Any]]
    ) -> AsyncIterator[ServerSentEvent]:
        """The lifecycle events, each output item opened when its first piece comes and closed
        when the next one starts or the reply ends (sse.py sends `reply.failed` if the engine fails)."""
        yield reply.event("response.created", response=reply.snapshot("in_progress"))
        yield reply.event("response.in_progress", response=reply.snapshot("in_progress"))
        opened: list[OutputItem] = []  # by output index; the last is the open one
        async for choice, delta in gen.deltas():
            if delta.text:
                if not opened:
                    opened.append(reply.message("", "in_progress"))
                    for event in reply.open(opened, 0):
                        yield event
                yield reply.event(
                    "response.output_text.delta",
                    item_id=opened[0].id,
                    output_index=0,
                    content_index=0,
                    delta=delta.text,
                    logprobs=[],
                )
            for piece in delta.tool_calls or []:
                if piece.id is not None:  # a call's first piece
                    if opened:
                        for event in reply.close(opened, choice, "completed"):
                            yield event
                    opened.append(reply.call(piece, "in_progress"))
                    for event in reply.open(opened, len(opened) - 1):
                        yield event
                if piece.arguments:
                    yield reply.event(
                        "response.function_call_arguments.delta",
                        item_id=opened[-1].id,
                        output_index=len(opened) - 1,
                        delta=piece.arguments,
                    )
        response = self._finish(reply, gen, conversation)
        if not opened:  # neither text nor calls: an empty message, as the whole response has
            opened.append(reply.message("", "in_progress"))
            for event in reply.open(opened, 0):
                yield event
        for event in reply.close(opened, gen.choices[0], response.output[-1].status):
            yield event
        yield reply.event(f"response.{response.status}", response=response)


class _Reply:
    """One response's id, its request's echo, and its stream's numbered events."""

    def __init__(self, req: ResponseRequest, hex_id: str, model: str) -> None:
        self.req = req
        self.hex_id = hex_id
        self.id = f"resp_{hex_id}"
        self.model = model
        self.sequence = 0

    def snapshot(
        self, status: Literal["in_progress", "completed", "incomplete", "failed"], **fields: Any
    ) -> ResponseObject:
        return ResponseObject(id=self.id, status=status, model=self.model, **self.req.echo(), **fields)

    def final(self, choice: ChoiceState, counts: TokenCounts) -> ResponseObject:
        cut = choice.finish_reason == "length"
        calls = [call for _, call in sorted(choice.tool_calls.items())]
        text = "".join(choice.text)
        output: list[OutputItem] = []
        if text or not calls:
            output.append(self.message(text, "incomplete" if cut and not calls else "completed"))
        output += [
            self.call(c, "incomplete" if cut and k == len(calls) - 1 else "completed") for k, c in enumerate(calls)
        ]
        return self.snapshot(
            "incomplete" if cut else "completed",
            output=output,
            usage=ResponseUsage(
                input_tokens=counts.prompt,
                input_tokens_details=InputTokensDetails(cached_tokens=counts.cached),
                output_tokens=counts.completion,
                total_tokens=counts.prompt + counts.completion,
            ),
            incomplete_details=IncompleteDetails() if cut else None,
        )

    def message(self, text: str, status: ItemStatus) -> OutputMessage:
        return OutputMessage(id=f"msg_{self.hex_id}", status=status, content=[OutputText(text=text)])

    def call(self, call: ToolCallDelta, status: ItemStatus) -> FunctionCallOut:
        return FunctionCallOut(
            id=f"fc_{self.hex_id}_{call.index}",
            call_id=call.id or "",
            name=call.name or "",
            arguments=call.arguments,
            status=status,
        )

    def event(self, kind: str, **fields: Any) -> ServerSentEvent:
        data = {"type": kind, "sequence_number": self.sequence}
        data.update({name: v.model_dump() if isinstance(v, BaseModel) else v for name, v in fields.items()})
        self.sequence += 1
        return ServerSentEvent(event=kind, data=json.dumps(data, ensure_ascii=False))

    def open(self, opened: list[OutputItem], index: int) -> list[ServerSentEvent]:
        item = opened[index]
        events = [self.event("response.output_item.added", output_index=index, item=item)]
        if isinstance(item, OutputMessage):
            events.append(
                self.event(
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    part=OutputText(text=""),
                )
            )
        return events

    def close(self, opened: list[OutputItem], choice: ChoiceState, status: ItemStatus) -> list[ServerSentEvent]:
        """The events that end the open (last) item, as far as `choice` got, with `status`."""
        index = len(opened) - 1
        item = opened[index]
        where = {"item_id": item.id, "output_index": index}
        if isinstance(item, OutputMessage):
            message = self.message("".join(choice.text), status)
            done: OutputItem = message
            part = message.content[0]
            events = [
                self.event("response.output_text.done", **where, content_index=0, text=part.text, logprobs=[]),
                self.event("response.content_part.done", **where, content_index=0, part=part),
            ]
        else:
            call = next(c for c in choice.tool_calls.values() if c.id == item.call_id)
            done = self.call(call, status)
            events = [
                self.event("response.function_call_arguments.done", **where, name=done.name, arguments=done.arguments)
            ]
        opened[index] = done
        return [*events, self.event("response.output_item.done", output_index=index, item=done)]

    def failed(self, error: APIError) -> ServerSentEvent:
        """What ends a stream the engine could not finish (sse.py's error event)."""
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        failure = ResponseError(code=code, message=error.info.message)
        return self.event("response.failed", response=self.snapshot("failed", error=failure))


def _assistant_message(choice: ChoiceState) -> dict[str, Any]:
    """The reply as the chat template takes it back in a follow-up."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(choice.text)}
    calls = [call for _, call in sorted(choice.tool_calls.items())]
    if calls:
        message["tool_calls"] = [template_tool_call(c.id or "", c.name or "", c.arguments) for c in calls]
    return message
