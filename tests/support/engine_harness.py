"""Drives an `LLMEngine` synchronously on the demo model, for engine tests."""

from __future__ import annotations

import functools
from dataclasses import replace

import mlx.core as mx
from mlx_lm import load

from server.engine.args import EngineArgs
from server.engine.factory import engine_model, load_engine, with_device_defaults
from server.engine.llm_engine import LLMEngine
from server.engine.model.demo_model import ensure_demo_model
from server.engine.types import RequestOutput, SamplingParams


@functools.lru_cache(maxsize=1)
def demo_model():
    """The demo model as mlx-lm loads it (its own forward pass is the tests' reference), and its tokenizer."""
    return load(str(ensure_demo_model()))


@functools.lru_cache(maxsize=1)
def demo_engine_model():
    """The demo model as the engine runs it (`factory.engine_model`), for every engine of the tests."""
    model, tokenizer = load(str(ensure_demo_model()))
    return engine_model(model), tokenizer


def make_engine(num_blocks: int = 64, runner=None, model=None, **args) -> LLMEngine:
    """The factory's engine on the demo model (or `model`, an engine model: `factory.engine_model`)
    with a cache of `num_blocks` blocks; `runner` replaces the model runner (the cache size is then
    the runner's)."""
    loaded = demo_engine_model() if model is None else (model, demo_model()[1])
    engine_args = EngineArgs(cache_tokens=num_blocks * 64, **args)
    if runner is None:
        return load_engine(engine_args, loaded)
    runner.num_blocks = num_blocks
    max_model_len = min(engine_args.max_model_len or num_blocks * 64, num_blocks * 64)
    resolved = replace(with_device_defaults(engine_args), max_model_len=max_model_len)  # as load_engine
    return LLMEngine(runner, loaded[1], resolved)


class ScriptedRunner:
    """Stands in for `ModelRunner` where the model's numbers don't matter: each sampling row's
    logits pick `script[request_id][i]` for its i-th output token (or token 100 past the end)."""

    block_size = 64

    def __init__(self, script: dict[str, list[int]] | None = None):
        self.script = script or {}
        self.vocab_size = demo_model()[0].args.vocab_size

    def run(self, plan) -> mx.array:
        vocab = self.vocab_size
        picks = []
        for s, n in plan.samples:
            script = self.script.get(s.request_id, [])
            first = len(s.output_ids) + s.num_pending  # the draws the engine has not read back count
            picks += [script[i] if i < len(script) else 100 for i in range(first, first + n)]
        return mx.where(mx.arange(vocab)[None] == mx.array(picks)[:, None], 10.0, 0.0)

    def cache_arrays(self) -> list:
        return []


def submit(engine: LLMEngine, request_id: str, prompt_ids: list[int], **params) -> RequestOutput:
    """Add a request (greedy unless `temperature` says otherwise); its output fills in as the engine steps."""
    params.setdefault("temperature", 0.0)
    out = RequestOutput(request_id)
    engine.add_request(prompt_ids, SamplingParams(**params), request_id, out)
    return out


def run_until_idle(engine: LLMEngine, max_steps: int = 10_000) -> int:
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
        assert steps < max_steps, "engine did not finish"
    return steps


def prompt(n: int, seed: int = 0) -> list[int]:
    """n token ids of ordinary (non-special) vocabulary."""
    return [16 + (seed * 7919 + i * 104729) % 1000 for i in range(n)]
