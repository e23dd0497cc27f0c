"""The real engine on the embedded demo model, behind a real uvicorn server, with the OpenAI SDK."""

import asyncio
import contextlib

import httpx
import openai
import pytest
from support.hardware import needs_reference_decode

from server.api.app import create_app
from server.engine import DEMO_MODEL_NAME, EngineArgs
from server.engine.factory import start_engine

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset


@pytest.fixture(scope="module")
def engine():
    engine = start_engine(EngineArgs(cache_tokens=64 * 256, max_num_seqs=16))
    yield engine
    engine.shutdown()


@pytest.fixture
def client(engine, serve_app):
    # The module's engine outlives each app, so the app's lifespan must not shut it down.
    app = create_app(engine)
    app.router.lifespan_context = _no_lifespan
    return openai.OpenAI(base_url=serve_app(app) + "/v1", api_key="unused", max_retries=0)


@contextlib.asynccontextmanager
async def _no_lifespan(app):
    yield


MESSAGES = [{"role": "user", "content": "Tell me about the quick brown fox."}]


def test_stream_and_non_stream_give_the_same_greedy_text(client):
    full = client.chat.completions.create(model=DEMO_MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=0)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 16

    chunks = list(
        client.chat.completions.create(
            model=DEMO_MODEL_NAME,
            messages=MESSAGES,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_stop_string_ends_the_text_before_it(client):
    free = client.chat.completions.create(model=DEMO_MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    text = free.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(
        model=DEMO_MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


@needs_reference_decode
def test_concurrent_requests_match_their_solo_output(client, engine):
    base = str(client.base_url)
    prompts = [[{"role": "user", "content": f"Request number {i}: " + "words " * (3 * i)}] for i in range(8)]
    solo = [
        client.chat.completions.create(model=DEMO_MODEL_NAME, messages=m, max_tokens=12, temperature=0)
        .choices[0]
        .message.content
        for m in prompts
    ]

    async def together():
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            bodies = [{"model": DEMO_MODEL_NAME, "messages": m, "max_tokens": 12, "temperature": 0} for m in prompts]
            replies = await asyncio.gather(*(http.post("/chat/completions", json=b) for b in bodies))
        return [r.json()["choices"][0]["message"]["content"] for r in replies]

    assert asyncio.run(together()) == solo
    assert engine.stats()["running"] == 0


def test_bad_input_is_a_400_and_the_server_keeps_serving(client, engine):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEMO_MODEL_NAME, messages=MESSAGES, max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=DEMO_MODEL_NAME,
            messages=[{"role": "user", "content": "word " * engine.max_model_len}],
            max_tokens=4,
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEMO_MODEL_NAME, messages=MESSAGES, logit_bias={"99999": 1})
    ok = client.chat.completions.create(model=DEMO_MODEL_NAME, messages=MESSAGES, max_tokens=2)
    assert ok.usage.completion_tokens == 2
