"""What chat and text completions share (server/api/generation.py, chat/serving.py), the message a
chat template sees (protocol.ChatMessage.to_template) and /metrics: usage counted once per prompt
with n choices, seeds per choice, streamed tool-call pieces joined, chunk shapes, metric names."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api.chat.protocol import ChatMessage
from server.api.chat.serving import _chunk_choice
from server.api.generation import ChoiceState
from server.api.metrics import Metrics
from server.engine.types import StreamDelta, TokenLogprob, ToolCallDelta

MODEL = "fake-model"


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [None, 7])
async def test_n_choices_of_several_prompts_count_each_prompt_once(client, engine, seed):
    # The fake echoes each prompt's words and then EOS: 2 + 1 and 3 + 1 completion tokens.
    body = {"model": MODEL, "prompt": ["one two", "three four five"], "n": 2, "seed": seed}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [(c["index"], c["text"].split()) for c in choices] == [
        (0, ["one", "two"]),
        (1, ["one", "two"]),
        (2, ["three", "four", "five"]),
        (3, ["three", "four", "five"]),
    ]
    usage = r.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (5, 14, 19)
    seeds = [params.seed for _, _, params in engine.requests]
    assert sorted(seeds, key=str) == sorted([None] * 4 if seed is None else [7, 7, 8, 8], key=str)


@pytest.mark.anyio
async def test_a_chat_with_n_counts_its_prompt_once(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a b c"}], "n": 3}
    usage = (await client.post("/v1/chat/completions", json=body)).json()["usage"]
    one = (await client.post("/v1/chat/completions", json={**body, "n": 1})).json()["usage"]
    assert usage["prompt_tokens"] == one["prompt_tokens"] > 0
    assert usage["completion_tokens"] == 3 * one["completion_tokens"] == 3 * 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def delta(text="", tokens=1, finish=None, calls=None, logprobs=None, cached=0):
    return StreamDelta(text, [0] * tokens, 5, tokens, cached, finish, logprobs, calls)


def test_a_choice_joins_streamed_tool_call_pieces_by_index():
    choice = ChoiceState(0, 5)
    choice.add(delta("hi", calls=[ToolCallDelta(0, id="c0", name="f", arguments='{"a"')]))
    choice.add(delta(calls=[ToolCallDelta(0, arguments=": 1}"), ToolCallDelta(1, id="c1", name="g")]))
    choice.add(delta(finish="tool_calls", tokens=3, cached=2))
    choice.add(delta(tokens=3))  # a later delta without a reason keeps the one already given
    calls = {i: (c.id, c.name, c.arguments) for i, c in choice.tool_calls.items()}
    assert calls == {0: ("c0", "f", '{"a": 1}'), 1: ("c1", "g", "")}
    assert "".join(choice.text) == "hi" and choice.finish_reason == "tool_calls"
    assert (choice.completion_tokens, choice.cached_tokens, choice.prompt_tokens) == (3, 0, 5)


def test_a_chunk_with_tool_calls_and_no_text_has_null_content_and_types_only_the_first_piece():
    chunk = _chunk_choice(
        2, delta(calls=[ToolCallDelta(0, id="c0", name="f"), ToolCallDelta(0, arguments="{}")]), False
    )
    assert chunk.index == 2 and chunk.delta.content is None
    assert [(t.index, t.id, t.type, t.function.name, t.function.arguments) for t in chunk.delta.tool_calls] == [
        (0, "c0", "function", "f", ""),
        (0, None, None, None, "{}"),
    ]


def test_a_chunk_without_calls_carries_its_text_even_empty_and_logprobs_only_when_asked():
    lp = [TokenLogprob("hé", -0.5, [("hé", -0.5)], bytes=[104, 195])]
    assert _chunk_choice(0, delta(""), False).delta.content == ""
    chunk = _chunk_choice(0, delta("hé", logprobs=lp), True)
    assert chunk.delta.content == "hé" and chunk.delta.tool_calls is None
    (out,) = chunk.logprobs.content
    assert (out.token, out.logprob, out.bytes) == ("hé", -0.5, [104, 195])
    assert [(t.token, t.logprob, t.bytes) for t in out.top_logprobs] == [("hé", -0.5, list("hé".encode()))]
    assert _chunk_choice(0, delta("hé", logprobs=lp), False).logprobs is None
    assert _chunk_choice(0, delta("x"), True).logprobs is None


def test_a_template_message_has_plain_text_the_system_role_and_parsed_arguments():
    msg = ChatMessage.model_validate(
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    )
    assert msg.to_template() == {"role": "system", "content": "a\nb"}
    call = ChatMessage.model_validate(
        {
            "role": "assistant",
            "name": "bot",
            "tool_calls": [
                {"id": "c0", "function": {"name": "f", "arguments": '{"x": 1}'}},
                {"id": "c1", "function": {"name": "g", "arguments": "not json"}},
            ],
        }
    )
    assert call.to_template() == {
        "role": "assistant",
        "content": "",
        "name": "bot",
        "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
            {"id": "c1", "type": "function", "function": {"name": "g", "arguments": "not json"}},
        ],
    }
    answer = ChatMessage.model_validate({"role": "tool", "content": "42", "tool_call_id": "c0"})
    assert answer.to_template() == {"role": "tool", "content": "42", "tool_call_id": "c0"}


class StatsEngine:
    model_name = "m"

    def stats(self):
        return {
            "running": 2,
            "waiting": 3,
            "cache_usage": 0.25,
            "prompt_tokens": 100,
            "cached_prompt_tokens": 40,
            "cached_prompt_tokens_disk": 15,
            "preemptions": 5,
            "generated_tokens": 77,
            "disk_cache_bytes": 4096,
            "disk_cache_bytes_written": 8192,
            "disk_cache_writes_dropped": 1,
            "disk_cache_files_rejected": 2,
            "spec_drafts": 10,
            "spec_draft_tokens": 30,
            "spec_accepted_tokens": 12,
        }


def samples(metrics: Metrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {
        s.name + (f"{{tier={s.labels['tier']}}}" if "tier" in s.labels else ""): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("model_name") == "m"
    }


def test_engine_counters_are_exported_under_vllm_names():
    got = samples(Metrics(StatsEngine()))
    assert {k: v for k, v in got.items() if "seconds" not in k} == {
        "mla:num_requests_running": 2,
        "mla:num_requests_waiting": 3,
        "mla:kv_cache_usage_perc": 0.25,
        "mla:prefix_cache_queries_total": 100,
        "mla:prefix_cache_hits_total": 40,
        "mla:prefix_cache_hits_by_tier_total{tier=memory}": 25,
        "mla:prefix_cache_hits_by_tier_total{tier=disk}": 15,
        "mla:disk_cache_bytes": 4096,
        "mla:disk_cache_bytes_written_total": 8192,
        "mla:disk_cache_writes_dropped_total": 1,
        "mla:disk_cache_files_rejected_total": 2,
        "mla:num_preemptions_total": 5,
        "mla:prompt_tokens_total": 100,
        "mla:generation_tokens_total": 77,
        "mla:spec_decode_num_drafts_total": 10,
        "mla:spec_decode_num_draft_tokens_total": 30,
        "mla:spec_decode_num_accepted_tokens_total": 12,
    }


def test_a_request_timer_observes_once_per_event_and_once_per_token():
    metrics = Metrics(StatsEngine())
    timer = metrics.timer()
    timer.first_token()
    timer.tokens(0)
    timer.tokens(3)
    timer.tokens(1)
    timer.finished()
    timer.finished()
    got = samples(metrics)
    assert got["mla:time_to_first_token_seconds_count"] == 1
    assert got["mla:inter_token_latency_seconds_count"] == 4
    assert got["mla:e2e_request_latency_seconds_count"] == 1
    assert got["mla:e2e_request_latency_seconds_sum"] >= got["mla:inter_token_latency_seconds_sum"] >= 0
    assert got["mla:e2e_request_latency_seconds_sum"] < 5


def test_a_count_the_engine_does_not_report_is_exported_as_zero():
    class Quiet(StatsEngine):
        def stats(self):
            return {"running": 1}

    got = samples(Metrics(Quiet()))
    assert got["mla:num_requests_running"] == 1
    assert got["mla:num_requests_waiting"] == 0 and got["mla:generation_tokens_total"] == 0
