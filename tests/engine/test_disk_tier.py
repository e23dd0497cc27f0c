"""The prefix cache's disk tier through the engine (llm_engine.py's docstring): prompt blocks are
written after the step that computes them, read back into the pool before a later engine's
request is scheduled, and give the same greedy tokens as computing them; a file that is not the
block asked for is never served."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.engine_harness import make_engine, prompt, run_until_idle, submit

from server.engine.disk_cache import SUFFIX, DiskCache, block_keys
from server.engine.llm_engine import DiskTier, LLMEngine

pytestmark = pytest.mark.slow  # loads the model or starts processes: not in the fast subset

BS = 64
FINGERPRINT = b"\x01" * 32
P = 5 * BS + 10  # five full prompt blocks, and a tail


def tiered(directory: Path, fingerprint: bytes = FINGERPRINT, max_bytes: int = 1 << 30, **args) -> LLMEngine:
    """A fresh demo engine (an empty pool: as after a restart) over the disk tier in `directory`."""
    base = make_engine(**args)
    cache = DiskCache(directory, max_bytes, base.runner.block_nbytes)  # type: ignore[attr-defined]
    return LLMEngine(base.runner, base.tokenizer, base.args, disk=DiskTier(cache, fingerprint))


def generate(engine: LLMEngine, ids: list[int], rid: str = "r") -> tuple[list[int], int]:
    """Greedy tokens of `ids` and the cached_tokens its usage reports."""
    out = submit(engine, rid, ids, max_tokens=8, ignore_eos=True)
    run_until_idle(engine)
    assert out.error is None
    return out.token_ids, out.deltas[-1].cached_tokens


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_restarted_engine_reads_the_prompt_blocks_from_disk_and_draws_the_same_tokens(tmp_path, mode):
    first = prompt(P)
    second = first + prompt(2 * BS, seed=1)  # the next turn: the first prompt, then more
    plain, _ = generate(make_engine(async_scheduling=mode), second)

    writer = tiered(tmp_path, async_scheduling=mode)
    generate(writer, first)
    writer.close()
    assert writer.stats()["disk_cache_blocks_written"] == 5  # prompt blocks only, not the tail

    reader = tiered(tmp_path, async_scheduling=mode)
    tokens, cached = generate(reader, second)
    assert cached == 5 * BS  # the first turn's blocks, all from disk
    assert tokens == plain
    stats = reader.stats()
    assert stats["cached_prompt_tokens_disk"] == 5 * BS and stats["disk_cache_blocks_read"] == 5


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + SUFFIX))


def _key_path(directory: Path, ids: list[int], block: int) -> Path:
    return directory / (block_keys(FINGERPRINT, ids, block + 1, BS)[block].hex() + SUFFIX)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_a_damaged_block_file_is_removed_never_served_and_the_request_still_succeeds(tmp_path, damage):
    ids = prompt(P)
    plain, _ = generate(make_engine(), ids)
    writer = tiered(tmp_path)
    generate(writer, ids)
    writer.close()
    damaged = _key_path(tmp_path, ids, 2)
    damage(damaged)

    reader = tiered(tmp_path)
    tokens, cached = generate(reader, ids)
    assert cached == 2 * BS  # the blocks before the damaged one
    assert tokens == plain
    reader.close()
    stats = reader.stats()
    # Removed, and written again from the recomputed block: a third start reads all five.
    assert stats["disk_cache_files_rejected"] == 1 and stats["disk_cache_blocks_written"] == 1
    assert generate(tiered(tmp_path), ids) == (plain, 5 * BS)


def test_another_models_block_is_never_served(tmp_path):
    """A file holding another model's block under this model's key (same tokens, so same shape)."""
    ids = prompt(P)
    plain, _ = generate(make_engine(), ids)
    writer = tiered(tmp_path, fingerprint=b"\x02" * 32)
    generate(writer, ids)
    writer.close()
    foreign = block_keys(b"\x02" * 32, ids, 1, BS)[0]
    (tmp_path / (foreign.hex() + SUFFIX)).rename(_key_path(tmp_path, ids, 0))

    reader = tiered(tmp_path)
    tokens, cached = generate(reader, ids)
    assert cached == 0 and tokens == plain
    assert reader.stats()["disk_cache_files_rejected"] == 1


def test_the_byte_bound_holds_under_a_stream_of_distinct_prompts(tmp_path):
    engine = make_engine()
    one = engine.runner.block_nbytes  # type: ignore[attr-defined]
    bound = 7 * one + 7 * 400  # room for 7 files (a payload and a header each), not 8
    engine = tiered(tmp_path, max_bytes=bound)
    for seed in range(4):  # two blocks each: 8 written
        generate(engine, prompt(2 * BS + 3, seed=seed), rid=str(seed))
        engine.disk.cache.flush()  # type: ignore[union-attr]
        assert sum(f.stat().st_size for f in _files(tmp_path)) <= bound
    stats = engine.stats()
    assert stats["disk_cache_blocks_written"] == 8 and len(_files(tmp_path)) == 7
    assert stats["disk_cache_bytes"] <= bound and stats["disk_cache_evictions"] == 1
    assert not _key_path(tmp_path, prompt(2 * BS + 3, seed=0), 0).exists()  # the oldest went
