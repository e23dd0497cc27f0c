"""The block manager's policy: prefix hits, LRU eviction of cached blocks, cached-token counts.

Pure Python: a sequence "computes" tokens by advancing `num_computed` and committing, as the
scheduler does after a step.
"""

from __future__ import annotations

from server.engine.core.block_manager import BlockManager
from server.engine.core.sequence import Sequence
from server.engine.types import SamplingParams

BS = 4


def seq_of(tokens: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(max_tokens=8), emit=lambda item: None)


def compute(bm: BlockManager, seq: Sequence, limit: int = 1000) -> None:
    """Admit `seq` and compute its whole prompt, registering every full block."""
    n = bm.admit(seq, limit)
    assert n, "the pool is short"
    seq.num_computed += n
    bm.commit(seq)
    while seq.num_remaining:
        assert bm.grow(seq, seq.num_remaining)
        seq.num_computed = len(seq)
        bm.commit(seq)


def blocks(*firsts: int) -> list[int]:
    """Blocks of BS tokens: block k holds firsts[k], firsts[k]+1, ..."""
    return [t for f in firsts for t in range(f, f + BS)]


def test_a_repeated_prompt_hits_every_full_block_but_the_last_token():
    bm = BlockManager(16, BS)
    first = seq_of(blocks(100, 200, 300) + [1])
    compute(bm, first)
    bm.release(first)
    assert len(bm.match_prefix(blocks(100, 200, 300) + [1])) == 3
    # Exactly three blocks: the last token must be computed, so the last block is not a hit.
    assert len(bm.match_prefix(blocks(100, 200, 300))) == 2
    assert len(bm.match_prefix(blocks(100, 200) + [5, 6])) == 2


def test_a_prefix_hit_needs_every_earlier_block_to_match():
    bm = BlockManager(16, BS)
    compute(bm, seq_of(blocks(100, 200, 300) + [1], "a"))
    # Starts with a's second block: the same tokens, but not the same prefix.
    assert bm.match_prefix(blocks(200, 300) + [1]) == []
    # Same first block, different second: only the first is a hit, the third never is.
    assert len(bm.match_prefix(blocks(100, 999, 300) + [1])) == 1
    second = seq_of(blocks(200, 300) + [1], "b")
    assert bm.admit(second, 1000) == len(second) and second.num_cached_prompt == 0


def _fill_with_released_prefixes(bm: BlockManager) -> list[list[int]]:
    """Three 2-block prompts computed and released in order a, b, c; the pool (6 blocks) then
    holds only their cached blocks."""
    prompts = [blocks(100, 110), blocks(200, 210), blocks(300, 310)]
    seqs = [seq_of(p, f"s{i}") for i, p in enumerate(prompts)]
    for s in seqs:
        compute(bm, s)
    for s in seqs:
        bm.release(s)
    assert bm.num_free == 6 and len(bm.cached) == 6
    return prompts


def hits(bm: BlockManager, prompt: list[int]) -> int:
    return len(bm.match_prefix(prompt + [0]))


def test_eviction_takes_the_least_recently_freed_block_first():
    bm = BlockManager(6, BS)
    a, b, c = _fill_with_released_prefixes(bm)
    fresh = seq_of(blocks(900), "new")
    assert bm.admit(fresh, 1000) == BS  # one block: evicts exactly one cached block
    # a was released first: it loses a block, its tail (its head still hits); b and c keep both.
    assert (hits(bm, a), hits(bm, b), hits(bm, c)) == (1, 2, 2)
    more = seq_of(blocks(800, 810), "more")
    assert bm.admit(more, 1000) == 2 * BS  # two more blocks: the rest of a, then b's tail
    assert (hits(bm, a), hits(bm, b), hits(bm, c)) == (0, 1, 2)


def test_a_hit_refreshes_nothing_until_released_again():
    """Taking a cached block removes it from the free list; releasing it makes it the most
    recently freed, so it outlives blocks freed before it."""
    bm = BlockManager(6, BS)
    a, b, c = _fill_with_released_prefixes(bm)
    again = seq_of(a + [0], "again")
    assert bm.admit(again, 1000) == 1 and again.num_cached_prompt == 2 * BS
    bm.release(again)
    grabbed = seq_of(blocks(700, 710, 720, 730) + [1], "big")
    assert bm.admit(grabbed, 4 * BS) == 4 * BS  # four blocks: b's and c's go first, a survives
    assert hits(bm, a) == 2 and hits(bm, b) == 0


def test_a_readmitted_preempted_request_keeps_its_first_cached_count():
    bm = BlockManager(16, BS)
    compute(bm, seq_of(blocks(100) + [1, 2], "warm"))  # caches one block the request shares
    seq = seq_of(blocks(100, 200) + [5, 6], "r")
    n = bm.admit(seq, 1000)
    assert seq.num_cached_prompt == BS and n == len(seq) - BS
    seq.num_computed += n
    bm.commit(seq)
    for t in (7, 8, 9):  # three outputs, the last not yet computed
        seq.append(t)
        assert bm.grow(seq, 1)
        seq.num_computed += 1
        bm.commit(seq)
    # Preempted: blocks released (its full ones stay cached), recomputed later.
    bm.release(seq)
    assert bm.admit(seq, 1000)
    assert seq.num_computed == 3 * BS  # its own cached blocks are hits now...
    assert seq.num_cached_prompt == BS  # ...but the request still reports what it found at first


def test_blocks_are_reference_counted_between_sharers():
    bm = BlockManager(8, BS)
    base = blocks(100, 200)
    a, b = seq_of(base + [1], "a"), seq_of(base + [2], "b")
    compute(bm, a)
    assert bm.admit(b, 1000) == 1 and b.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.release(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.release(b)
    assert bm.num_free == 8 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_a_freed_block_with_nothing_cached_is_reused_before_any_cached_block():
    bm = BlockManager(3, BS)
    first = seq_of(blocks(100) + [1], "first")
    compute(bm, first)  # one full block (cached) and one partial
    bm.release(first)
    scratch = seq_of([7, 8, 9, 10, 11], "scratch")
    assert bm.admit(scratch, 1000) == 5  # two blocks, never filled: nothing cached in them
    bm.release(scratch)
    assert bm.admit(seq_of([5, 6, 7], "one"), 1000) == 3  # one block: one of scratch's, not the cached one
    assert hits(bm, blocks(100)) == 1


def test_adopted_blocks_extend_the_cached_prefix_and_never_evict_it():
    """`adopt` (the disk tier's blocks): free blocks published after the cached prefix, unheld;
    the free blocks it takes are the least recently used ones outside that prefix."""
    bm = BlockManager(4, BS)
    a = seq_of(blocks(100) + [1], "a")
    compute(bm, a)
    bm.release(a)
    b = seq_of(blocks(500, 600) + [1], "b")
    compute(bm, b)
    bm.release(b)  # free, least recent first: b's tail, then a's block 100, then b's blocks
    ids = blocks(100, 200, 300, 400) + [1]
    prefix = bm.match_prefix(ids)
    first, adopted = bm.adopt(ids, 5)
    assert first == 1 and len(adopted) == 3  # the three other free blocks: 100's is kept
    assert bm.match_prefix(ids) == [*prefix, *adopted]
    assert bm.num_free == 4 and all(bm.blocks[b].ref_count == 0 for b in adopted)
