"""Cache blocks: who owns which, and which full blocks can be shared as a cached prefix.

Every layer's pool has the same number of blocks, so one block id names a block in all layers.
A full block is keyed by a hash chained over the token ids of it and all blocks before it; a new
sequence whose prompt starts with cached blocks takes them (reference-counted) instead of
recomputing them. Blocks nobody holds stay cached until they are evicted, least recently used first.
A block is published (`commit`) once the engine knows its contents final: the rule is in
llm_engine.py's docstring.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .sequence import Sequence


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def chain_hash(prev: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks, least recently used first; those with a hash are still prefix hits.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached blocks that hold a prefix of `token_ids`, leaving at least one token to compute."""
        bs, h = self.block_size, None
        hits: list[int] = []
        if not self.prefix_caching:
            return hits
        for start in range(0, len(token_ids) - 1 - bs + 1, bs):
            chunk = tuple(token_ids[start : start + bs])
            h = chain_hash(h, chunk)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != chunk:
                break
            hits.append(bid)
        return hits

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        total = -(-(seq.num_computed + num_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def admit(self, seq: Sequence, limit: int) -> int:
        """Give a waiting sequence its prefix hits and room for a first chunk of at most `limit`
        tokens; return that chunk's length, or 0 (and no change) if the pool is short."""
        hits = self.match_prefix(seq.token_ids)
        hit_tokens = len(hits) * self.block_size
        chunk = min(len(seq) - hit_tokens, limit)
        fresh = -(-(hit_tokens + chunk) // self.block_size) - len(hits)
        reusable_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if fresh > self.num_free - reusable_free:
            return 0
        for bid in hits:
            self._take(bid)
        seq.block_table = list(hits)
        seq.num_committed_blocks = len(hits)
        seq.num_computed = hit_tokens
        if not seq.output_ids:  # a recomputed (preempted) sequence keeps its first count
            seq.num_cached_prompt = hit_tokens
        self.grow(seq, chunk)
        return chunk

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for `num_tokens` more tokens of `seq`; False (and no change) if the pool is short."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free:
            return False
        for _ in range(need):
            block = self._pop_free()
            block.ref_count = 1
            seq.block_table.append(block.id)
        return True

    def adopt(self, token_ids: list[int], count: int) -> tuple[int, list[int]]:
        """Publish up to `count` free blocks as the full blocks of `token_ids` that follow its
        cached prefix, unheld (prefix hits, evictable like any cached block), for the caller to
        fill with their contents (the disk tier: llm_engine.py). Returns the index of the first
        block adopted and the ids adopted. Takes the least recently used free blocks that are not
        part of the cached prefix itself, which is made recent."""
        hits = self.match_prefix(token_ids)
        for bid in hits:
            if self.blocks[bid].ref_count == 0:
                self.free.move_to_end(bid)
        spare = self.num_free - sum(1 for b in hits if self.blocks[b].ref_count == 0)
        bs, first = self.block_size, len(hits)
        h = self.blocks[hits[-1]].hash if hits else None
        adopted: list[int] = []
        for i in range(first, first + min(count, spare)):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(h, chunk)
            block = self._pop_free()
            block.hash, block.token_ids = h, chunk
            self.cached.setdefault(h, block.id)
            self.free[block.id] = None  # back, most recently used
            adopted.append(block.id)
        return first, adopted

    def commit(self, seq: Sequence, upto: int | None = None) -> None:
        """Publish the blocks of `seq` full of computed tokens whose ids are known, among its first
        `upto` tokens (all when None), from the first one not published yet: a later prompt that
        starts with the same tokens takes them instead of computing them.

        When a block's contents are final is the engine's rule (`LLMEngine`: prompt blocks when
        the step that writes them is built, blocks of generated tokens when it is read back); here,
        a token's id is known once it is in `token_ids` (a draw not read back is not)."""
        bs = self.block_size
        end = min(seq.num_computed, len(seq.token_ids))
        if upto is not None:
            end = min(end, upto)
        first, last = seq.num_committed_blocks, end // bs
        if first >= last:
            return
        tokens = seq.token_ids
        h = self.blocks[seq.block_table[first - 1]].hash if first else None
        for i in range(first, last):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            h = chain_hash(h, chunk)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, chunk
                self.cached.setdefault(h, block.id)
        seq.num_committed_blocks = last

    def release(self, seq: Sequence) -> None:
        """Return a sequence's blocks, its full ones published first (freed, they could not be
        later): those of known tokens its built steps write, some of them maybe still running;
        the last blocks go to the back of the LRU order last."""
        self.commit(seq)
        for bid in reversed(seq.block_table):
            self._drop(bid)
        seq.block_table = []
        seq.num_computed = seq.num_committed_blocks = 0

    def shrink(self, seq: Sequence) -> None:
        """Return the blocks of `seq` past its computed tokens (after a rollback: they hold only
        rejected drafted tokens, so none of them is published)."""
        keep = -(-seq.num_computed // self.block_size)
        assert keep >= seq.num_committed_blocks, "a published block was rolled back"
        for bid in reversed(seq.block_table[keep:]):
            self._drop(bid)
        del seq.block_table[keep:]

    def _drop(self, bid: int) -> None:
        block = self.blocks[bid]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[bid] = None
            if block.hash is None:
                self.free.move_to_end(bid, last=False)  # nothing cached: reuse first

    def forget_prefixes(self) -> None:
        """Unpublish every cached block: after a failed step, blocks published before the steps
        that write them had run (prompt blocks, those a sequence let go of) may never have been
        written."""
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.cached.clear()

    def _pop_free(self) -> Block:
        """The least recently used free block, its cached contents (if any) forgotten."""
        bid, _ = self.free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None:
            if self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        return block

    def _take(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self.free[bid]
        block.ref_count += 1
