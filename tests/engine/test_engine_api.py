"""The engine's offline API (`LLMEngine.add_request` / `generate`, server/engine/llm_engine.py): the
same outputs as the async client the server uses, each prompt its own output in order, refusals
and aborts as the output's error, usage numbers, and outputs forced to given tokens."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import mlx.core as mx
import pytest
from support.engine_harness import demo_model, make_engine, prompt, submit
from support.hardware import needs_reference_decode
from support.reference_loop import int4_latent_cache

from server.engine.args import EngineArgs
from server.engine.factory import start_engine
from server.engine.types import InvalidRequest, OutputConstraint, RequestOutput, SamplingParams, StreamDelta

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

PROMPTS = [prompt(n, seed=i) for i, n in enumerate((150, 7, 64, 30))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@needs_reference_decode
def test_generate_gives_the_async_clients_greedy_tokens():
    outputs = make_engine(num_blocks=32, max_num_seqs=4).generate(PROMPTS, GREEDY)
    client = start_engine(EngineArgs(cache_tokens=64 * 32, max_num_seqs=4))  # its own thread, as served

    async def stream(i: int) -> list[int]:
        return [t async for d in client.generate(f"a{i}", PROMPTS[i], GREEDY) for t in d.token_ids]

    async def every() -> list[list[int]]:
        return await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(len(PROMPTS)))), 60)

    try:
        streamed = asyncio.run(every())
    finally:
        client.shutdown()
    assert [o.token_ids for o in outputs] == streamed
    assert all(len(t) == 10 for t in streamed)


def test_each_prompt_gets_its_own_output_in_prompt_order_with_its_usage():
    engine = make_engine(num_blocks=32)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (5, 3, 8, 1)]
    together = engine.generate(PROMPTS, params)
    alone = [make_engine(num_blocks=32).generate([p], q)[0] for p, q in zip(PROMPTS, params, strict=True)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [len(o.token_ids) for o in together] == [5, 3, 8, 1]
    assert len({o.request_id for o in together}) == len(PROMPTS)
    for out, ids in zip(together, PROMPTS, strict=True):
        assert out.finish_reason == "length" and out.error is None
        assert (out.prompt_tokens, out.completion_tokens) == (len(ids), len(out.token_ids))
        assert out.text == engine.tokenizer.decode(out.token_ids)
    assert not engine.has_work and engine.blocks.num_free == len(engine.blocks.blocks)


def test_a_second_generate_reuses_the_first_ones_prefix_and_says_so():
    engine = make_engine(num_blocks=32)
    first = engine.generate([PROMPTS[0]], GREEDY)[0]
    again = engine.generate([PROMPTS[0]], GREEDY)[0]
    assert again.cached_tokens == 128 and first.cached_tokens == 0  # two full blocks of 150 tokens
    assert again.token_ids == first.token_ids and again.request_id != first.request_id


def test_a_refused_prompt_ends_with_its_error_and_the_rest_still_run():
    engine = make_engine(num_blocks=32)
    empty, ok = engine.generate([[], PROMPTS[1]], GREEDY)
    assert isinstance(empty.error, InvalidRequest) and not empty.deltas and empty.finished
    assert ok.error is None and len(ok.token_ids) == 10


def test_add_request_keeps_a_given_id_makes_new_ones_and_drops_output_nobody_reads():
    engine = make_engine(num_blocks=32)
    longer = replace(GREEDY, max_tokens=20)
    assert engine.add_request(PROMPTS[1], longer, "mine") == "mine"
    made = {engine.add_request(PROMPTS[1], longer) for _ in range(3)}
    assert len(made) == 3 and "mine" not in made
    outputs = engine.generate([PROMPTS[2]], GREEDY)  # steps until idle: the others run to their end too
    assert outputs[0].request_id not in made and len(outputs[0].token_ids) == 10
    assert not engine.has_work and engine.counters["generated_tokens"] == 4 * 20 + 10


def test_an_aborted_request_streams_nothing_more_and_the_others_finish():
    engine = make_engine(num_blocks=32)
    long = submit(engine, "long", PROMPTS[1], max_tokens=200, ignore_eos=True)
    short = submit(engine, "short", PROMPTS[3], max_tokens=12, ignore_eos=True)
    for _ in range(4):
        engine.step()
    assert engine.abort("long") is not None and engine.abort("long") is None
    seen = len(long.token_ids)
    while engine.has_work:
        engine.step()
    assert 0 < seen == len(long.token_ids) and not long.finished
    assert len(short.token_ids) == 12 and short.finish_reason == "length"
    assert engine.blocks.num_free == len(engine.blocks.blocks)


def test_an_output_ends_once():
    out = RequestOutput("r")
    out(StreamDelta("a", [1], 3, 1, finish_reason="length"))
    with pytest.raises(AssertionError, match="after its end"):
        out(StreamDelta("b", [2], 3, 2))
    refused = RequestOutput("s")
    refused(InvalidRequest("no"))
    with pytest.raises(AssertionError):
        refused(InvalidRequest("again"))


@needs_reference_decode
def test_an_output_forced_to_given_tokens_is_those_tokens_with_the_models_logprobs():
    model, _ = demo_model()
    ids = PROMPTS[3]
    forced = prompt(6, seed=9)
    engine = make_engine(num_blocks=32)
    params = SamplingParams(
        temperature=0.0, logprobs=True, max_tokens=6, constraint=OutputConstraint(tokens=tuple(forced))
    )
    out = engine.generate([ids], params)[0]
    assert out.token_ids == forced and out.finish_reason == "stop"
    # mlx-lm's forward over prompt + forced tokens (INT4 latent): the log-softmax at each forced one.
    with int4_latent_cache(model) as cache:
        logits = model(mx.array([ids + forced[:-1]]), cache=cache)[0, len(ids) - 1 :].astype(mx.float32)
    want = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[mx.arange(6), mx.array(forced)]
    got = mx.array([lp.logprob for lp in out.logprobs])
    assert got.shape == (6,) and mx.allclose(got, want, atol=1e-3).item(), (got, want)
    wrong = engine.generate([ids], SamplingParams(max_tokens=2, constraint=OutputConstraint(tokens=(1, 10**9))))[0]
    assert isinstance(wrong.error, InvalidRequest) and "out of range" in str(wrong.error)
