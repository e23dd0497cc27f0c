"""/v1/completions' serving (server/api/completions/serving.py) over the fake engine: how prompts,
echoes, choices, logprob offsets and the usage chunk come out, whole and streamed."""

from __future__ import annotations

import pytest
from support.sse import DONE, sse_events

from server.api.completions.serving import completion_logprobs
from server.engine.types import TokenLogprob

MODEL = "fake-model"


async def complete(client, **body):
    return await client.post("/v1/completions", json={"model": MODEL, "max_tokens": 3, **body})


@pytest.mark.anyio
async def test_choices_are_indexed_prompt_major_and_usage_counts_each_prompt_once(client):
    r = await complete(client, prompt=["one two", "three four five"], n=2, temperature=0)
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    # The fake echoes the prompt's words: choices 0-1 answer the first prompt, 2-3 the second.
    assert [c["text"].split()[0] for c in body["choices"]] == ["one", "one", "three", "three"]
    assert body["usage"]["prompt_tokens"] == 2 + 3
    # Every choice's tokens count (EOS among them): 2 words + EOS, or 3 words cut by max_tokens.
    assert body["usage"]["completion_tokens"] == 4 * 3


@pytest.mark.anyio
async def test_a_stream_sends_the_echo_first_the_usage_last_then_done(client):
    r = await complete(client, prompt="alpha beta", echo=True, stream=True, stream_options={"include_usage": True})
    events = sse_events(r)
    assert events[-1] == DONE
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 2
    texts = [e["choices"][0]["text"] for e in events[:-2]]
    assert texts[0] == "alpha beta"  # the echo comes alone, before any generated text
    whole = (await complete(client, prompt="alpha beta", echo=True)).json()["choices"][0]["text"]
    assert "".join(texts) == whole
    assert [e["choices"][0]["finish_reason"] for e in events[:-2]].count(None) == len(texts) - 1


@pytest.mark.anyio
async def test_no_usage_chunk_unless_asked(client):
    events = sse_events(await complete(client, prompt="alpha beta", stream=True))
    assert events[-1] == DONE and all(e["choices"] for e in events[:-1])


def test_logprob_offsets_count_characters_from_the_echo():
    lps = [TokenLogprob("ab", -0.5, [("ab", -0.5), ("x", -1.0)]), TokenLogprob(" c", -0.25)]
    out = completion_logprobs(lps, offset=7)
    assert out.text_offset == [7, 9]
    assert out.tokens == ["ab", " c"] and out.token_logprobs == [-0.5, -0.25]
    assert out.top_logprobs == [{"ab": -0.5, "x": -1.0}, None]
