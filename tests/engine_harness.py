"""Drives an `LLMEngine` synchronously on the demo model, for engine tests."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from mlx_lm import load

from server.engine.demo_model import ensure_demo_model
from server.engine.llm_engine import EngineConfig, LLMEngine
from server.engine.model_runner import ModelRunner
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams, StreamDelta


@functools.lru_cache(maxsize=1)
def demo_model():
    return load(str(ensure_demo_model()))


def make_engine(num_blocks: int = 64, **config) -> LLMEngine:
    model, tokenizer = demo_model()
    runner = ModelRunner(model, num_blocks=num_blocks)
    return LLMEngine(runner, tokenizer, EngineConfig(**config), num_blocks)


@dataclass
class Collector:
    deltas: list[StreamDelta] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)

    def __call__(self, item) -> None:
        (self.errors if isinstance(item, Exception) else self.deltas).append(item)

    @property
    def tokens(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def finish_reason(self) -> str | None:
        return self.deltas[-1].finish_reason if self.deltas else None


def submit(engine: LLMEngine, request_id: str, prompt_ids: list[int], **params) -> Collector:
    params.setdefault("temperature", 0.0)
    out = Collector()
    engine.add(Sequence(request_id, list(prompt_ids), SamplingParams(**params), emit=out))
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
