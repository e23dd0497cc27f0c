"""One layer's paged MLA latent cache: INT4 latent (MLX affine 4-bit) plus the rope key.

Tokens live in blocks of `block_size`; a slot is `block_id * block_size + offset`.
The four fields are plain `mx.array`s that the engine may read and set; the decode kernels
update them in place (see `mla_decode.py` for the invariants that requires).
"""

from __future__ import annotations

import mlx.core as mx

BITS = 4


def latent_bytes_per_token(R: int, P: int, group_size: int, dtype: mx.Dtype) -> int:
    """Cache bytes one token takes in one layer: packed INT4 latent, its scales and biases, k_pe."""
    groups = R // group_size
    return 4 * (R // 8) + dtype.size * (2 * groups + P)


class LatentCache:
    """Fields (num_blocks = NB, block_size = BS):

    packed  uint32 [NB, BS, R // 8]        exactly `mx.quantize(latent, group_size, bits=4)[0]`
    scales  dtype  [NB, BS, R // group_size]
    biases  dtype  [NB, BS, R // group_size]
    k_pe    dtype  [NB, BS, P]             rotated rope key
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 64,
        R: int = 256,
        P: int = 64,
        group_size: int = 64,
        dtype: mx.Dtype = mx.float16,
    ):
        if R % group_size or R % 8:
            raise ValueError(f"R={R} must be a multiple of group_size={group_size} and of 8")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.R = R
        self.P = P
        self.group_size = group_size
        self.dtype = dtype
        self.packed = mx.zeros((num_blocks, block_size, R // 8), dtype=mx.uint32)
        self.scales = mx.zeros((num_blocks, block_size, R // group_size), dtype=dtype)
        self.biases = mx.zeros((num_blocks, block_size, R // group_size), dtype=dtype)
        self.k_pe = mx.zeros((num_blocks, block_size, P), dtype=dtype)
        # The last fused decode step's output: the next step takes it as an input so that the
        # GPU runs the two in order (see mla_decode.py, invariant 2).
        self.last_out: mx.array | None = None

    @property
    def bytes_per_token(self) -> int:
        return latent_bytes_per_token(self.R, self.P, self.group_size, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_size * self.bytes_per_token

    def arrays(self) -> list[mx.array]:
        """The four fields, for `mx.eval(*cache.arrays())`."""
        return [self.packed, self.scales, self.biases, self.k_pe]

    def write(self, slots: mx.array, latent: mx.array, k_pe: mx.array) -> None:
        """Quantize and store tokens (used by prefill).

        slots int32 [N]; latent [N, R] normed, not quantized; k_pe [N, P] rotated.
        The update is functional (MLX scatter), lazy until the caller evaluates the fields.
        """
        blk = slots // self.block_size
        off = slots % self.block_size
        q, s, b = mx.quantize(latent.astype(self.dtype), self.group_size, BITS)
        self.packed[blk, off] = q
        self.scales[blk, off] = s
        self.biases[blk, off] = b
        self.k_pe[blk, off] = k_pe.astype(self.dtype)

    def read(self, block_ids: mx.array, num_tokens: int) -> tuple[mx.array, mx.array]:
        """The first `num_tokens` tokens of a block list (used by prefill over a cached prefix).

        block_ids int32 [n] -> (latent [num_tokens, R] dequantized in dtype, k_pe [num_tokens, P]).
        """
        n = block_ids.shape[0]
        if num_tokens > n * self.block_size:
            raise ValueError(f"{num_tokens} tokens do not fit in {n} blocks of {self.block_size}")
        T = n * self.block_size

        def rows(a: mx.array) -> mx.array:
            return a[block_ids].reshape(T, a.shape[-1])[:num_tokens]

        latent = mx.dequantize(rows(self.packed), rows(self.scales), rows(self.biases), self.group_size, BITS)
        return latent.astype(self.dtype), rows(self.k_pe)
