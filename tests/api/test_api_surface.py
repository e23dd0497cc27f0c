"""The OpenAI surface beyond chat: /v1/completions, /v1/models/{id}, n choices, /metrics, CORS,
text parts, through a real uvicorn and the official SDK (the fake engine, and the real demo engine
where the engine's own behaviour is the point)."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from support import sse_events
from support.fake_engine import FakeEngine

from server.api.app import create_app
from server.api.chat.protocol import ChatMessage

MODEL = "fake-model"
HELLO = [{"role": "user", "content": "hello there world"}]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(model_name=MODEL, max_model_len=256)


@pytest.fixture
def base(engine, serve_app) -> str:
    return serve_app(create_app(engine))


def sdk(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def test_completions_take_text_texts_and_token_ids(base, engine):
    client = sdk(base)
    one = client.completions.create(model=MODEL, prompt="red green blue", max_tokens=8)
    assert one.object == "text_completion" and one.choices[0].text == "red green blue"
    assert one.choices[0].finish_reason == "stop" and one.usage.prompt_tokens == 3

    many = client.completions.create(model=MODEL, prompt=["a b", "c d e"], max_tokens=8)
    assert [(c.index, c.text) for c in many.choices] == [(0, "a b"), (1, "c d e")]
    assert many.usage.prompt_tokens == 5

    ids = engine.tokenizer.encode("one two")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8)
    assert by_ids.choices[0].text == "one two"
    nested = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=8)
    assert len(nested.choices) == 2


def test_completions_stream_echo_and_logprobs(base):
    client = sdk(base)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="x y z", max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "x y z"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 4  # three words and EOS

    echoed = client.completions.create(model=MODEL, prompt="x y", max_tokens=8, echo=True)
    assert echoed.choices[0].text == "x yx y"

    scored = client.completions.create(model=MODEL, prompt="x y", max_tokens=8, logprobs=2)
    lp = scored.choices[0].logprobs
    assert [t.strip() for t in lp.tokens[:2]] == ["x", "y"] and len(lp.token_logprobs) == len(lp.tokens)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert len(lp.top_logprobs[0]) == 2


@pytest.mark.parametrize(
    "extra,param", [({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"), ({"echo": True, "logprobs": 1}, "echo")]
)
def test_unsupported_completion_options_are_refused(base, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(base).completions.create(model=MODEL, prompt="x", max_tokens=4, **extra)
    assert refused.value.body["param"] == param


def test_a_model_is_found_by_its_id(base):
    client = sdk(base)
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_text_parts_are_joined_with_a_newline(base, engine):
    sdk(base).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "story"}, {"type": "text", "text": "about"}]}],
        max_tokens=4,
    )
    assert [engine.tokenizer.piece(t).strip() for t in engine.requests[-1][1][-2:]] == ["story", "about"]
    parts = ChatMessage.model_validate(
        {"role": "user", "content": [{"type": "text", "text": "story"}, {"type": "text", "text": "about"}]}
    )
    assert parts.to_template()["content"] == "story\nabout"


def test_metrics_are_prometheus_text_behind_the_api_key(engine, serve_app):
    base = serve_app(create_app(engine, api_key="k"))
    assert httpx.get(f"{base}/metrics").status_code == 401
    sdk(base, "k").chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
    text = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer k"}).text
    for name in [
        "mla:num_requests_running",
        "mla:num_requests_waiting",
        "mla:kv_cache_usage_perc",
        "mla:prefix_cache_hits_total",
        "mla:num_preemptions_total",
        "mla:prompt_tokens_total",
        "mla:generation_tokens_total",
    ]:
        assert re.search(rf"^{re.escape(name)}\{{model_name=\"{MODEL}\"\}} ", text, re.M), name
    assert re.search(r'^mla:time_to_first_token_seconds_count\{model_name="fake-model"\} 1\.0$', text, re.M)
    assert re.search(r'^mla:e2e_request_latency_seconds_count\{model_name="fake-model"\} 1\.0$', text, re.M)
    assert re.search(r'^mla:inter_token_latency_seconds_count\{model_name="fake-model"\} [1-9]', text, re.M)


def test_cors_is_off_by_default_and_on_for_named_origins(engine, serve_app):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    closed = serve_app(create_app(engine))
    r = httpx.options(f"{closed}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    opened = serve_app(create_app(engine, cors_origins=["http://app.example"]))
    r = httpx.options(f"{opened}/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"


def test_n_choices_share_the_prompt_blocks_and_differ_by_seed(demo_engine, serve_engine):
    base = serve_engine(demo_engine).removesuffix("/v1")
    client = sdk(base)
    before = demo_engine.stats()
    prompt = [{"role": "user", "content": "a long shared prompt " * 40}]  # several full blocks
    reply = client.chat.completions.create(
        model=demo_engine.model_name, messages=prompt, n=3, max_tokens=12, temperature=1.0, seed=7
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    after = demo_engine.stats()
    prompt_tokens = reply.usage.prompt_tokens
    # The prompt is prefilled once: choices 1 and 2 find every full block of it cached.
    hits = after["cached_prompt_tokens"] - before["cached_prompt_tokens"]
    assert hits == 2 * (prompt_tokens // 64) * 64
    assert 3 <= reply.usage.completion_tokens <= 3 * 12  # every choice's tokens, the prompt once
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1  # seed, seed + 1, seed + 2
    again = client.chat.completions.create(
        model=demo_engine.model_name, messages=prompt, n=3, max_tokens=12, temperature=1.0, seed=7
    )
    assert [c.message.content for c in again.choices] == texts

    events = sse_events(
        httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": demo_engine.model_name, "messages": prompt, "n": 2, "max_tokens": 6, "stream": True},
            timeout=60,
        )
    )
    finishes = [c["choices"][0]["index"] for c in events[:-1] if c["choices"][0].get("finish_reason")]
    assert sorted(finishes) == [0, 1] and events[-1] == "[DONE]"


def test_health_says_which_decode_backend_runs_and_why(demo_engine, serve_engine):
    base = serve_engine(demo_engine).removesuffix("/v1")
    decode = httpx.get(f"{base}/health").json()["engine"]["decode"]
    assert decode["backend"] in ("reference", "cpu", "cuda", "metal") and decode["ok"] is True
    assert decode["detail"]  # the start-up check's numbers, or why none ran
