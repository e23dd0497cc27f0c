"""Random decode problems for the kernel tests, the kernel self-test and the kernel benchmark."""

from __future__ import annotations

from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from server.kernels.latent_cache import LatentCache


class Case(NamedTuple):
    lens: list[int]  # context_lens, one per sequence
    H: int
    R: int
    dtype: mx.Dtype
    group_size: int = 64
    poisoned: bool = False  # block table entries outside the pool: see `poison_table`


# Lengths 0, 1, 63, 64, 65 and thousands, mixed in one batch, Mistral Small 4 (R=256) and
# DeepSeek-V3 (R=512) widths, 1 to 128 heads, both half types.
SHAPE_CASES = [
    Case([0], 1, 256, mx.float16),
    Case([1], 32, 256, mx.bfloat16),
    Case([0, 1, 63, 64, 65], 32, 256, mx.float16),
    Case([65, 0, 64, 1, 63, 7, 130, 2], 16, 512, mx.bfloat16),
    Case([3000, 64, 0], 8, 256, mx.float16),
    Case([2500], 128, 512, mx.bfloat16),
]

# The other quant groups the cache and the kernel take (every case above uses 64).
GROUP_CASES = [
    Case([0, 1, 63, 64, 65], 8, 256, mx.float16, group_size=32),
    Case([130, 7, 64], 16, 512, mx.bfloat16, group_size=32),
    Case([0, 1, 63, 64, 65], 8, 256, mx.bfloat16, group_size=128),
    Case([700, 2, 129], 16, 512, mx.float16, group_size=128),
]


# Block-table entries outside [0, num_blocks): sequence 0 loses its first block (-5), sequence 1's
# append block points past the pool (its append is dropped), sequence 2 is untouched.
POISONED_CASES = [
    Case([100, 70, 5], 16, 256, mx.float16, poisoned=True),
    Case([200, 64, 3000, 0], 32, 256, mx.bfloat16, poisoned=True),
]


def poison_table(table: mx.array, num_blocks: int) -> mx.array:
    """A copy of `table` with entry [0, 0] = -5 and [1, 1] = num_blocks + 7 (sequence 1 needs at
    least 64 tokens cached, so that column 1 is its append block)."""
    t = np.array(table)
    t[0, 0] = -5
    t[1, 1] = num_blocks + 7
    return mx.array(t)


def filled_cache(
    context_lens: list[int],
    R: int,
    P: int,
    dtype: mx.Dtype,
    block_size: int = 64,
    group_size: int = 64,
    spare_blocks: int = 3,
    seed: int = 0,
) -> tuple[LatentCache, mx.array]:
    """A cache whose sequences hold `context_lens[b]` random tokens in shuffled blocks.

    Returns (cache, block_table int32 [B, max_blocks]); every row has room for one more token,
    and padding entries are -1 (a kernel must never read them).
    """
    rng = np.random.default_rng(seed)
    need = [(n + 1 + block_size - 1) // block_size for n in context_lens]
    num_blocks = sum(need) + spare_blocks
    order = rng.permutation(num_blocks)
    table = -np.ones((len(context_lens), max(need)), np.int32)
    cache = LatentCache(num_blocks, block_size, R, P, group_size, dtype)
    start = 0
    for b, (n, k) in enumerate(zip(context_lens, need, strict=True)):
        table[b, :k] = order[start : start + k]
        start += k
        if n:
            pos = np.arange(n)
            slots = table[b, pos // block_size] * block_size + pos % block_size
            cache.write(
                mx.array(slots.astype(np.int32)),
                mx.array(rng.standard_normal((n, R)).astype(np.float32)),
                mx.array(rng.standard_normal((n, P)).astype(np.float32)),
            )
    mx.eval(*cache.arrays())
    return cache, mx.array(table)


def decode_inputs(
    B: int, H: int, R: int, P: int, dtype: mx.Dtype, seed: int = 1
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """(q_latent [B,H,R], q_pe [B,H,P], new_latent [B,R], new_kpe [B,P]) in dtype."""
    rng = np.random.default_rng(seed)

    def f(*shape: int) -> mx.array:
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    return f(B, H, R), f(B, H, P), f(B, R), f(B, P)


def cache_as_numpy(cache: LatentCache) -> dict[str, Any]:
    """The four fields as numpy: packed uint32, the others float32."""
    return {
        "packed": np.array(cache.packed),
        **{k: np.array(getattr(cache, k).astype(mx.float32)) for k in ("scales", "biases", "k_pe")},
    }


def random_pool(
    num_blocks: int, block_size: int, R: int, P: int, dtype: mx.Dtype, group_size: int = 64, seed: int = 0
) -> LatentCache:
    """A pool of random (not zero) bytes, generated on the default device: for timing."""
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    cache = LatentCache(num_blocks, block_size, R, P, group_size, dtype)
    cache.packed = mx.random.randint(0, 2**31 - 1, cache.packed.shape, mx.int32, key=k1).view(mx.uint32)
    cache.scales = mx.full(cache.scales.shape, 0.12, dtype)
    cache.biases = mx.full(cache.biases.shape, -0.9, dtype)
    cache.k_pe = mx.random.normal(cache.k_pe.shape, key=k2).astype(dtype)
    mx.eval(*cache.arrays())
    return cache


def contiguous_tables(B: int, max_blocks: int) -> mx.array:
    """int32 [B, max_blocks]: sequence b owns blocks b * max_blocks ... (b + 1) * max_blocks - 1."""
    return mx.arange(B * max_blocks, dtype=mx.int32).reshape(B, max_blocks)
