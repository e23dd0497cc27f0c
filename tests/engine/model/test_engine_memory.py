"""A step's memory does not grow with the cache pool: the pool is written in place (prefill
scatter into donated buffers, the decode kernel's in-place append), never copied."""

import mlx.core as mx
import pytest
from support.engine_harness import make_engine, prompt, submit

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset


def _peak_of_mixed_step(num_blocks: int) -> int:
    engine = make_engine(num_blocks=num_blocks, prefill_chunk_size=64, max_num_batched_tokens=80)
    for i in range(4):
        submit(engine, f"d{i}", prompt(30, seed=i), max_tokens=50, ignore_eos=True)
    engine.step()
    engine.step()
    submit(engine, "p", prompt(200, seed=9), max_tokens=2)
    engine.step()  # warm: the first mixed step may build lazily-made helpers
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    engine.step()  # decodes 4 sequences and prefills a 64-token chunk, in one step
    mx.synchronize()
    return mx.get_peak_memory() - base


def test_mixed_step_memory_does_not_grow_with_the_pool():
    small = _peak_of_mixed_step(64)
    large = _peak_of_mixed_step(64 * 64)  # 64x the pool: ~37 MiB a layer for the demo model
    pool_layer_bytes = 64 * 64 * 64 * 144
    assert large - small < pool_layer_bytes // 16, (small, large)
