"""`mla_decode_append`: one decode step of MLA attention over the paged INT4 latent cache.

Picks the fused kernel for the default device (Metal on an Apple GPU, CUDA when MLX has it),
or the plain-MLX reference otherwise, when `backend="reference"`, or for a shape the kernel
does not cover (float32 caches; Metal shapes beyond its 32 KB of threadgroup memory).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import mlx.core as mx

from .fused import mla_decode_append_fused
from .latent_cache import LatentCache
from .reference import mla_decode_append_reference

BACKENDS = ("reference", "metal", "cuda")

log = logging.getLogger(__name__)


@lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    log.warning("%s; decoding with the plain-MLX reference instead", reason)


def default_backend() -> str:
    if mx.default_device() == mx.gpu:
        if mx.metal.is_available():
            return "metal"
        if mx.cuda.is_available():
            return "cuda"
    return "reference"


def mla_decode_append(q_latent: mx.array, q_pe: mx.array, new_latent: mx.array, new_kpe: mx.array,
                      cache: LatentCache, block_table: mx.array, context_lens: mx.array,
                      scale: float, *, backend: str | None = None) -> mx.array:
    """Attend one new token per sequence over its cached tokens plus itself, and append it.

    q_latent [B, H, R] (nope query times W_UK); q_pe [B, H, P] rotated;
    new_latent [B, R] normed, not quantized; new_kpe [B, P] rotated;
    block_table int32 [B, max_blocks]; context_lens int32 [B] tokens already cached.
    scores = scale * (q_latent . latent + q_pe . k_pe) over the context_lens[b] cached tokens and
    the new token (its quantized-then-dequantized latent); out = softmax(scores) @ latent.
    Returns out [B, H, R] in cache.dtype; afterwards the cache holds the new token of sequence b
    at position context_lens[b].
    """
    if backend not in (None, *BACKENDS):
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    chosen = backend or default_backend()
    if chosen != "reference":
        try:
            return mla_decode_append_fused(chosen, q_latent, q_pe, new_latent, new_kpe, cache,
                                           block_table, context_lens, scale)
        except NotImplementedError as exc:
            if backend is not None:
                raise
            # A shape the kernel does not cover (e.g. float32, or too big for Metal's 32 KB
            # of threadgroup memory): the reference computes the same thing, only slower.
            _warn_once(str(exc))
    return mla_decode_append_reference(q_latent, q_pe, new_latent, new_kpe, cache,
                                       block_table, context_lens, scale)
