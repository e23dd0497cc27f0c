"""/v1/responses through a real uvicorn and the official openai SDK, on the demo model: whole and
streamed replies, tool conversations, the store behind previous_response_id, GET and DELETE, and
errors as the SDK's exception classes."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from support.fake_engine import FakeEngine
from support.sse import sse_events
from support.tool_schemas import FORECAST

from server.api.app import create_app

TOOLS = [
    {"type": "function", "name": "get_forecast", "description": "Weather", "parameters": FORECAST},
    {
        "type": "function",
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
    },
]
SCHEMAS = {t["name"]: t["parameters"] for t in TOOLS}
ASK = "What is the weather in Paris?"


@pytest.fixture
def engine(demo_engine):
    return demo_engine


@pytest.fixture
def base(engine, serve_engine) -> str:
    return serve_engine(engine)


@pytest.fixture
def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)


def streamed(client: openai.OpenAI, **request: object) -> tuple[object, list[object]]:
    """The final response of a streamed request as the SDK reassembles it, and its events."""
    with client.responses.stream(**request) as stream:
        events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    return last.response, events


def items(response: object) -> list[dict[str, object]]:
    return [item.model_dump(exclude_none=True) for item in response.output]


def without_ids(response: object) -> list[dict[str, object]]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items(response)]


def test_a_stream_reassembled_by_the_sdk_equals_the_whole_reply_under_the_same_seed(engine, client):
    for request in (
        {"input": ASK, "max_output_tokens": 24},  # text, cut: incomplete
        {"input": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "name": "get_forecast"}},
        {"input": ASK, "tools": TOOLS, "tool_choice": "required", "max_output_tokens": 12},  # a call cut
    ):
        request = {"model": engine.model_name, "temperature": 1.0, "extra_body": {"seed": 5}, **request}
        whole = client.responses.create(**request)
        final, events = streamed(client, **request)
        assert final.status == whole.status and final.usage.output_tokens == whole.usage.output_tokens
        assert without_ids(final) == without_ids(whole)
        # Each item streamed is the final one: the done events carry what the response holds.
        done = [e.item.model_dump(exclude_none=True) for e in events if e.type == "response.output_item.done"]
        assert done == items(final)
        if request.get("tools"):
            assert sum(e.type == "response.function_call_arguments.delta" for e in events) > 2  # as generated
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.output[-1].type == "function_call" and whole.output[-1].status == "incomplete"


def test_get_final_response_of_a_completed_stream(engine, client):
    request = {"model": engine.model_name, "input": ASK, "tools": TOOLS, "tool_choice": "required"}
    with client.responses.stream(**request, temperature=0.0) as stream:
        final = stream.get_final_response()
    assert final.status == "completed"
    (call,) = final.output
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_required_tool_choice_gives_a_valid_call_100_of_100(engine, base):
    async def run() -> list[object]:
        async with openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300) as client:
            return list(
                await asyncio.gather(
                    *[
                        client.responses.create(
                            model=engine.model_name,
                            input=ASK,
                            tools=TOOLS,
                            tool_choice="required",
                            parallel_tool_calls=False,
                            temperature=1.0,
                            max_output_tokens=80,
                            store=False,
                            extra_body={"seed": i},
                        )
                        for i in range(100)
                    ]
                )
            )

    for response in asyncio.run(run()):
        assert response.status == "completed", response
        (call,) = response.output
        assert call.type == "function_call" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_a_multi_turn_tool_conversation_streamed_and_whole(engine, client):
    first = client.responses.create(
        model=engine.model_name, input=ASK, tools=TOOLS, tool_choice="required", temperature=0.0, store=False
    )
    (call,) = first.output
    history = [
        {"role": "user", "content": ASK},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
    ]
    request = {
        "model": engine.model_name,
        "input": history,
        "tools": TOOLS,
        "max_output_tokens": 16,
        "temperature": 0.0,
    }
    answer = client.responses.create(**request, tool_choice="none")
    final, _ = streamed(client, **request, tool_choice="none")
    assert answer.output[0].type == "message" and answer.output_text
    assert final.output_text == answer.output_text
    # The call and its result reached the template: the prompt holds them.
    assert answer.usage.input_tokens > first.usage.input_tokens + 10


def test_previous_response_id_continues_the_conversation_from_its_cached_prefix(engine, client):
    instructions = "Answer as the scriptures would. " * 20  # several cache blocks
    first = client.responses.create(
        model=engine.model_name, instructions=instructions, input=ASK, max_output_tokens=8, temperature=0.0
    )
    second = client.responses.create(
        model=engine.model_name,
        instructions=instructions,
        previous_response_id=first.id,
        input="And tomorrow?",
        max_output_tokens=8,
        temperature=0.0,
    )
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0
    final, _ = streamed(
        client,
        model=engine.model_name,
        instructions=instructions,  # not carried over from the previous response, as OpenAI's are not
        previous_response_id=second.id,
        input="And after?",
        max_output_tokens=4,
    )
    assert final.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    assert final.usage.input_tokens_details.cached_tokens > 0
    assert client.responses.retrieve(final.id).output == final.output


def test_the_store_is_bounded_and_delete_removes(engine, serve_engine):
    client = openai.OpenAI(base_url=serve_engine(engine, stored_responses=2), api_key="unused", max_retries=0)
    ids = [
        client.responses.create(model=engine.model_name, input=f"Verse {i}", max_output_tokens=2).id for i in range(3)
    ]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])  # the oldest went first
    assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:]
    client.responses.delete(ids[1])
    for gone in (lambda: client.responses.retrieve(ids[1]), lambda: client.responses.delete(ids[1])):
        with pytest.raises(openai.NotFoundError):
            gone()
    unstored = client.responses.create(model=engine.model_name, input="Verse", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    assert client.responses.retrieve(ids[2]).id == ids[2]  # the unstored one evicted nothing


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "content"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "supported items"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"tool_choice": "required"}, None),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, None),
    ],
)
def test_what_cannot_be_honoured_is_a_bad_request(engine, client, request_, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**{"model": engine.model_name, "input": ASK, **request_})
    assert refused.value.body["type"] == "invalid_request_error"
    assert (param or "") in (refused.value.body["param"] or "") + refused.value.body["message"]


def test_unknown_ids_and_models_are_not_found(engine, client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model=engine.model_name, input=ASK, previous_response_id="resp_nope")
    assert missing.value.body["code"] == "previous_response_not_found"
    assert missing.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError) as model:
        client.responses.create(model="gpt-5", input=ASK)
    assert model.value.body["code"] == "model_not_found"


def test_json_schema_text_format_is_enforced(engine, client):
    fmt = {"type": "json_schema", "name": "forecast", "schema": FORECAST, "strict": True}
    response = client.responses.create(
        model=engine.model_name, input=ASK, text={"format": fmt}, temperature=1.0, max_output_tokens=80
    )
    jsonschema.validate(json.loads(response.output_text), FORECAST)
    assert response.text.format.type == "json_schema"


def test_what_codex_sends_is_accepted_and_its_hosted_tools_are_not_offered(engine, client):
    namespace = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents", "tools": [TOOLS[1]]}
    input_ = [
        {
            "type": "message",
            "id": "msg_1",
            "role": "developer",
            "content": [{"type": "input_text", "text": "Be brief."}],
        },
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ASK}]},
    ]
    hints = {
        "reasoning": {"summary": "auto"},
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "session",
        "client_metadata": {"session_id": "s"},
    }
    response = client.responses.create(
        model=engine.model_name,
        input=input_,
        tools=[TOOLS[0], namespace, {"type": "web_search", "external_web_access": False}],
        tool_choice="required",
        parallel_tool_calls=True,
        store=False,
        max_output_tokens=60,
        extra_body=hints,
    )
    assert {item.name for item in response.output} == {"get_forecast"}  # get_time was only in the namespace
    assert [t.type for t in response.tools] == ["function", "namespace", "web_search"]


@pytest.mark.anyio
async def test_a_stream_the_engine_fails_ends_with_response_failed() -> None:
    app = create_app(FakeEngine(model_name="fake-model", fail_after=2))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        reply = await http.post(
            "/v1/responses", json={"model": "fake-model", "input": "one two three four", "stream": True}
        )
    events = sse_events(reply)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["id"] == events[0]["response"]["id"]
