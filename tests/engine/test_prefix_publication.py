"""When cache blocks are published as cached prefixes (llm_engine.py's docstring): prompt blocks
when the step that writes them is built, blocks holding generated tokens only once the step that
writes them has been read back, so a step that fails (as one whose drafted tokens are rejected
will be rolled back) leaves none of them registered."""

from __future__ import annotations

import mlx.core as mx
import pytest
from support.engine_harness import ScriptedRunner, make_engine, prompt, run_until_idle, submit

from server.engine.types import EngineError

P = 130  # two full prompt blocks of 64, and the third block's first two positions
LAST = 191  # the third block's last position, written by the step whose input is output 61


class FailsWriting(ScriptedRunner):
    """The step that writes position `at` of a sequence fails when the device evaluates it."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def run(self, plan) -> mx.array:
        logits = super().run(plan)
        if any(s.num_computed <= self.at < s.num_computed + n for s, n in plan.decodes + plan.prefills):
            logits = logits + mx.linalg.inv(mx.zeros((2, 2)), stream=mx.cpu).sum()  # raises when evaluated
        return logits


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_block_of_generated_tokens_is_published_once_the_step_writing_it_is_read_back(mode):
    engine = make_engine(runner=ScriptedRunner(), async_scheduling=mode)
    out = submit(engine, "g", prompt(P), max_tokens=70, ignore_eos=True)
    while engine.has_work:
        engine.step()
        read = len(out.token_ids)  # the step that drew the last of them wrote the position before it
        assert len(engine.blocks.cached) == max(P // 64, (P + read - 1) // 64), read
    assert len(engine.blocks.cached) == 3


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_failed_step_leaves_no_block_of_generated_tokens_it_writes_registered(mode):
    engine = make_engine(runner=FailsWriting(LAST), async_scheduling=mode)
    out = submit(engine, "g", prompt(P), max_tokens=70, ignore_eos=True)
    with pytest.raises(RuntimeError, match="LU factorization failed"):
        run_until_idle(engine)
    assert len(out.token_ids) == LAST - P + 1  # every token of the third block was read back
    assert len(engine.blocks.cached) == 2  # the prompt's blocks, published when their step was built
    engine.fail_all(EngineError("internal engine error: RuntimeError"))  # as AsyncEngine does
    assert out.error is not None and not engine.blocks.cached
