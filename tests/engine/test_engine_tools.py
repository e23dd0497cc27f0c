"""Structured output and tools through the engine on the random demo model (issue 9)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from mlx_lm.tool_parsers import mistral
from support.engine_harness import ScriptedRunner, make_engine, run_until_idle, submit

from server.engine.types import InvalidRequest, OutputConstraint, RequestOutput, ToolSpec

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}
WEATHER = ToolSpec(
    "get_weather",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
)
CLOCK = ToolSpec("get_time", {})  # no parameters: the arguments are {}
TOOLS = (WEATHER, CLOCK)


@pytest.fixture(scope="module")
def engine():
    return make_engine(num_blocks=128, max_num_seqs=100)


def chat(engine, text: str, tools: tuple[ToolSpec, ...] = ()) -> list[int]:
    schema = [{"type": "function", "function": {"name": t.name, "parameters": t.parameters}} for t in tools]
    return list(
        engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tools=schema or None, add_generation_prompt=True
        )
    )


def calls(out: RequestOutput) -> list[dict]:
    """The deltas' tool calls reassembled by index, as a client does."""
    merged: dict[int, dict] = {}
    for delta in out.deltas:
        for piece in delta.tool_calls or []:
            call = merged.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = piece.id or call["id"]
            call["name"] = piece.name or call["name"]
            call["arguments"] += piece.arguments
    return [merged[i] for i in sorted(merged)]


def test_json_schema_100_of_100_at_temperature_1(engine):
    p = chat(engine, "Describe a person as JSON.")
    constraint = OutputConstraint(json_schema=PERSON)
    outs = [
        submit(engine, f"j{i}", p, temperature=1.0, max_tokens=200, seed=i, constraint=constraint) for i in range(100)
    ]
    run_until_idle(engine)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    assert len({o.text for o in outs}) > 50  # sampled, not one forced answer


def test_json_object(engine):
    schema_free = OutputConstraint(json_object=True)
    outs = [
        submit(
            engine,
            f"o{i}",
            chat(engine, "JSON please"),
            temperature=0.0,
            max_tokens=300,
            seed=i,
            constraint=schema_free,
        )
        for i in range(3)
    ]
    run_until_idle(engine)
    for out in outs:
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:  # a random model may write one long key; then it is cut off mid-object
            assert out.finish_reason == "length" and out.text.startswith("{")


def test_invalid_schema_is_invalid_request_before_any_token(engine):
    out = submit(engine, "bad", chat(engine, "x"), constraint=OutputConstraint(json_schema={"type": "nope"}))
    assert not out.deltas and out.finished
    assert isinstance(out.error, InvalidRequest) and "nope" in str(out.error)
    assert out.error.param == "response_format"
    out = submit(engine, "bad2", chat(engine, "x"), constraint=OutputConstraint(tools=TOOLS, tool_choice="missing"))
    assert isinstance(out.error, InvalidRequest) and out.error.param == "tool_choice"
    assert not engine.has_work


def test_max_tokens_mid_object_is_length(engine):
    out = submit(
        engine,
        "short",
        chat(engine, "x"),
        temperature=1.0,
        seed=3,
        max_tokens=5,
        constraint=OutputConstraint(json_schema=PERSON),
    )
    run_until_idle(engine)
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert out.text.startswith('{"name"') and out.text.count('"') < 7


def test_tool_choice_required_100_of_100(engine):
    p = chat(engine, "What is the weather in Paris?", TOOLS)
    constraint = OutputConstraint(tools=TOOLS, tool_choice="required")
    outs = [
        submit(engine, f"t{i}", p, temperature=1.0, max_tokens=200, seed=i, constraint=constraint) for i in range(100)
    ]
    run_until_idle(engine)
    by_name = {t.name: t for t in TOOLS}
    for out in outs:
        assert out.finish_reason == "tool_calls", out.text
        assert out.text == ""
        made = calls(out)
        assert made and [c["id"].startswith("call_") for c in made]
        for call in made:
            args = json.loads(call["arguments"])
            jsonschema.validate(
                args, by_name[call["name"]].parameters or {"type": "object", "additionalProperties": False}
            )
    assert {c["name"] for o in outs for c in calls(o)} == {"get_weather", "get_time"}


def test_named_function_and_no_parallel_calls(engine):
    p = chat(engine, "Weather?", TOOLS)
    constraint = OutputConstraint(tools=TOOLS, tool_choice="get_weather", parallel_tool_calls=False)
    outs = [
        submit(engine, f"n{i}", p, temperature=1.0, max_tokens=200, seed=i, constraint=constraint) for i in range(20)
    ]
    run_until_idle(engine)
    for out in outs:
        made = calls(out)
        assert out.finish_reason == "tool_calls" and len(made) == 1 and made[0]["name"] == "get_weather"
        jsonschema.validate(json.loads(made[0]["arguments"]), WEATHER.parameters)


def test_streamed_calls_equal_the_parsed_reply_under_the_same_seed(engine):
    p = chat(engine, "Weather?", TOOLS)
    constraint = OutputConstraint(tools=TOOLS, tool_choice="required")
    first, second = (
        submit(engine, f"s{k}", p, temperature=1.0, max_tokens=200, seed=42, constraint=constraint) for k in range(2)
    )
    run_until_idle(engine)
    assert first.token_ids == second.token_ids
    strip = [{k: c[k] for k in ("name", "arguments")} for c in calls(first)]
    assert strip == [{k: c[k] for k in ("name", "arguments")} for c in calls(second)]
    # The whole reply, parsed at once by mlx-lm's parser, gives the same calls; their arguments
    # are the model's own JSON text.
    text = engine.tokenizer.decode(first.token_ids, skip_special_tokens=False).removesuffix("</s>")
    sections = [part for part in text.split("[TOOL_CALLS]") if part]
    parsed = [mistral.parse_tool_call(part) for part in sections]
    assert [(c["name"], json.loads(c["arguments"])) for c in strip] == [(c["name"], c["arguments"]) for c in parsed]
    assert [c["arguments"] for c in strip] == [part.split("[ARGS]", 1)[1] for part in sections]
    # Deltas: a call's first piece carries its index, id and name, later ones its arguments as they come.
    pieces = [c for d in first.deltas for c in d.tool_calls or []]
    heads = [c for c in pieces if c.id]
    assert [c.index for c in heads] == list(range(len(strip))) and all(c.name for c in heads)
    assert all(c.name is None and c.arguments for c in pieces if not c.id)
    assert len(pieces) > 3 * len(heads)  # the arguments came in several pieces


def test_mixed_batch_free_rows_are_unchanged(engine):
    p = chat(engine, "Tell me something.")
    alone = submit(engine, "free-alone", p, temperature=1.0, seed=7, max_tokens=40)
    run_until_idle(engine)
    mixed = []
    for i in range(6):
        if i % 2:
            mixed.append(submit(engine, f"m{i}", p, temperature=1.0, seed=7, max_tokens=40))
        else:
            mixed.append(
                submit(
                    engine,
                    f"m{i}",
                    p,
                    temperature=1.0,
                    seed=i,
                    max_tokens=200,
                    logprobs=True,
                    top_logprobs=2,
                    constraint=OutputConstraint(json_schema=PERSON),
                )
            )
    run_until_idle(engine)
    for i, out in enumerate(mixed):
        if i % 2:
            assert out.token_ids == alone.token_ids and out.text == alone.text
        else:
            jsonschema.validate(json.loads(out.text), PERSON)
            assert all(d.logprobs and len(d.logprobs[0].top) == 2 for d in out.deltas)


def test_seeded_constrained_output_repeats_and_stop_strings_apply(engine):
    p = chat(engine, "JSON")
    c = OutputConstraint(json_schema=PERSON)
    a, b = (submit(engine, f"r{k}", p, temperature=1.0, seed=11, max_tokens=200, constraint=c) for k in range(2))
    stopped = submit(engine, "stop", p, temperature=1.0, seed=11, max_tokens=200, constraint=c, stop=['"age"'])
    run_until_idle(engine)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert stopped.finish_reason == "stop" and a.text.startswith(stopped.text) and '"age"' not in stopped.text


# -- scripted model outputs: what tool_choice "none" and "auto" do with a given reply ------------
def _ids(engine, text: str) -> list[int]:
    return list(engine.tokenizer.encode(text, add_special_tokens=False))


def test_tool_choice_none_never_calls():
    engine = make_engine(num_blocks=8, runner=ScriptedRunner())
    start = _ids(engine, "[TOOL_CALLS]")
    engine.runner.script = {
        "none": start * 5,
        "auto": start + _ids(engine, 'get_weather[ARGS]{"city": "Oslo", "unit": "c"}') + [2],
    }
    p = chat(engine, "weather?", TOOLS)
    none = submit(engine, "none", p, max_tokens=5, constraint=OutputConstraint(tools=TOOLS, tool_choice="none"))
    auto = submit(engine, "auto", p, max_tokens=50, constraint=OutputConstraint(tools=TOOLS))
    run_until_idle(engine)
    assert start[0] not in none.token_ids and not calls(none) and none.finish_reason == "length"
    assert auto.finish_reason == "tool_calls" and auto.text == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls(auto)] == [
        ("get_weather", {"city": "Oslo", "unit": "c"})
    ]


def test_auto_content_then_calls_and_unparsable_tool_text():
    engine = make_engine(num_blocks=8, runner=ScriptedRunner())
    start = _ids(engine, "[TOOL_CALLS]")
    call = _ids(engine, "get_time[ARGS]{}")
    engine.runner.script = {
        "two": _ids(engine, "Let me check.") + start + call + start + call + [2],
        "one": start + call + start + call + [2],
        "junk": _ids(engine, "Hi") + start + _ids(engine, "not a call") + [2],
        "plain": _ids(engine, "Let me check.") + start + call + [2],
        "cut": start + _ids(engine, 'get_time[ARGS]{"a": 1'),
    }
    p = chat(engine, "x", TOOLS)
    two = submit(engine, "two", p, max_tokens=60, constraint=OutputConstraint(tools=TOOLS))
    one = submit(engine, "one", p, max_tokens=60, constraint=OutputConstraint(tools=TOOLS, parallel_tool_calls=False))
    junk = submit(engine, "junk", p, max_tokens=60, constraint=OutputConstraint(tools=TOOLS))
    cut = submit(
        engine, "cut", p, max_tokens=len(engine.runner.script["cut"]), constraint=OutputConstraint(tools=TOOLS)
    )
    plain = submit(engine, "plain", p, max_tokens=60)  # no tools offered: the syntax is not parsed
    run_until_idle(engine)
    assert two.text == "Let me check." and two.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls(two)] == [("get_time", "{}")] * 2
    assert len({c["id"] for c in calls(two)}) == 2
    assert len(calls(one)) == 1 and one.finish_reason == "tool_calls"
    assert junk.text == "Hi[TOOL_CALLS]not a call" and junk.finish_reason == "stop" and not calls(junk)
    assert cut.finish_reason == "length" and cut.text == ""
    assert [(c["name"], c["arguments"]) for c in calls(cut)] == [("get_time", '{"a": 1')]  # as far as it got
    assert not calls(plain) and plain.finish_reason == "stop" and plain.text.startswith("Let me check.get_time")
