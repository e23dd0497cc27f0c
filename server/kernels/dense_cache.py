"""One layer's paged MLA latent cache without quantization: the latent and rope key in bf16.

The engine's `--latent-cache bf16` (EngineArgs.latent_cache): 2 * (R + P) bytes per token and
layer (640 for Mistral Small 4's R = 256, P = 64) against the INT4 cache's 272, for when quality
must be bit-comparable with an unquantized cache (as mlx-lm's own, for a bf16 model), and as the
baseline `python -m server.eval perplexity` measures the INT4 cache against.

Same paging, slots and `write` / `read` interface as `LatentCache`; decode is `decode_append`, in
plain MLX (the fused kernels read the INT4 layout only), with `mla_decode_append`'s semantics.
"""

from __future__ import annotations

import mlx.core as mx

DTYPE = mx.bfloat16


def dense_bytes_per_token(R: int, P: int) -> int:
    """Cache bytes one token takes in one layer: latent and k_pe in bf16."""
    return DTYPE.size * (R + P)


class DenseLatentCache:
    """Fields (num_blocks = NB, block_size = BS), both bf16:

    latent  [NB, BS, R]   normed latent, not quantized
    k_pe    [NB, BS, P]   rotated rope key
    """

    def __init__(self, num_blocks: int, block_size: int = 64, R: int = 256, P: int = 64):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.R = R
        self.P = P
        self.dtype = DTYPE
        self.latent = mx.zeros((num_blocks, block_size, R), dtype=DTYPE)
        self.k_pe = mx.zeros((num_blocks, block_size, P), dtype=DTYPE)

    @property
    def bytes_per_token(self) -> int:
        return dense_bytes_per_token(self.R, self.P)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_size * self.bytes_per_token

    def arrays(self) -> list[mx.array]:
        return [self.latent, self.k_pe]

    def write(self, slots: mx.array, latent: mx.array, k_pe: mx.array) -> None:
        """Store tokens: slots int32 [N]; latent [N, R] normed; k_pe [N, P] rotated."""
        blk = slots // self.block_size
        off = slots % self.block_size
        self.latent[blk, off] = latent.astype(DTYPE)
        self.k_pe[blk, off] = k_pe.astype(DTYPE)

    def read(self, block_ids: mx.array, num_tokens: int) -> tuple[mx.array, mx.array]:
        """The first `num_tokens` tokens of a block list: (latent [num_tokens, R], k_pe [num_tokens, P])."""
        n = block_ids.shape[0]
        if num_tokens > n * self.block_size:
            raise ValueError(f"{num_tokens} tokens do not fit in {n} blocks of {self.block_size}")

        def rows(a: mx.array) -> mx.array:
            return a[block_ids].reshape(n * self.block_size, a.shape[-1])[:num_tokens]

        return rows(self.latent), rows(self.k_pe)

    def decode_append(
        self,
        q_latent: mx.array,
        q_pe: mx.array,
        new_latent: mx.array,
        new_kpe: mx.array,
        block_table: mx.array,
        context_lens: mx.array,
        scale: float,
    ) -> mx.array:
        """`mla_decode_append` over this cache: append each sequence's new token at position
        context_lens[b], then attend over its context_lens[b] + 1 tokens. q_latent [B, H, R],
        q_pe [B, H, P] -> out [B, H, R] (float32). The block table's entries must lie in the pool."""
        B = q_latent.shape[0]
        bs = self.block_size
        context_lens = context_lens.astype(mx.int32)
        block_table = block_table.astype(mx.int32)
        blk = mx.take_along_axis(block_table, (context_lens // bs)[:, None], axis=1)[:, 0]
        self.write(blk * bs + context_lens % bs, new_latent, new_kpe)
        T = block_table.shape[1] * bs
        latent = self.latent[block_table].reshape(B, T, self.R).astype(mx.float32)
        k_pe = self.k_pe[block_table].reshape(B, T, self.P).astype(mx.float32)
        scores = q_latent.astype(mx.float32) @ latent.swapaxes(1, 2)
        scores = (scores + q_pe.astype(mx.float32) @ k_pe.swapaxes(1, 2)) * scale
        valid = mx.arange(T)[None, :] <= context_lens[:, None]
        scores = mx.where(valid[:, None, :], scores, -mx.inf)
        out: mx.array = mx.softmax(scores, axis=-1) @ latent
        return out
