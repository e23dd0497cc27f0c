"""The real engine behind its asyncio client (`AsyncEngine`, as the server runs it): a caller that
closes its stream early aborts the request, and the engine gives back its sequence and blocks."""

from __future__ import annotations

import asyncio

import pytest

from server.engine import EngineArgs
from server.engine.factory import start_engine
from server.engine.types import SamplingParams

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset


@pytest.fixture(scope="module")
def engine():
    engine = start_engine(EngineArgs(cache_tokens=64 * 32, max_num_seqs=4))
    yield engine
    engine.shutdown()


# Bounds every wait on the engine, so that a broken engine fails a test instead of hanging it.
STEP_S = 10.0


async def _last(deltas):
    return [d async for d in deltas][-1]


def idle(engine) -> bool:
    stats = engine.stats()
    return stats["running"] == 0 and stats["waiting"] == 0 and stats["cache_blocks_free"] == stats["cache_blocks"]


async def until_idle(engine, timeout: float = 10.0) -> bool:
    """Wait (with the event loop running) until no sequence runs or waits and every block is free."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not idle(engine):
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.parametrize("streams", [1, 3])
def test_closing_the_stream_early_aborts_the_request_and_frees_its_blocks(engine, streams):
    # The whole context (~1900 tokens): many seconds of decoding, so only an abort frees it soon.
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    prompt = list(range(20, 150))  # three blocks of 64, so a leak shows in the block count

    async def read_two_and_leave(i: int) -> int:
        deltas = engine.generate(f"early-{streams}-{i}", prompt, params)
        seen = [await asyncio.wait_for(anext(deltas), STEP_S) for _ in range(2)]
        await deltas.aclose()
        return sum(len(d.token_ids) for d in seen)

    async def main() -> tuple[list[int], bool]:
        got = await asyncio.gather(*(read_two_and_leave(i) for i in range(streams)))
        # The loop stays open meanwhile, as the server's does: the abort reports back through it.
        freed = await until_idle(engine, timeout=5.0)
        # Whatever happened, leave nothing running for the next test (nor emitting to a closed loop).
        for i in range(streams):
            engine.abort(f"early-{streams}-{i}")
        await until_idle(engine)
        return list(got), freed

    tokens, freed = asyncio.run(main())
    assert tokens == [2] * streams
    assert freed, engine.stats()


def test_a_finished_request_frees_its_blocks_too(engine):
    async def main() -> tuple[str | None, bool]:
        deltas = engine.generate("whole", list(range(20, 90)), SamplingParams(max_tokens=3, ignore_eos=True))
        last = await asyncio.wait_for(_last(deltas), STEP_S)
        return last.finish_reason, await until_idle(engine)

    finish, freed = asyncio.run(main())
    assert finish == "length" and freed, engine.stats()
