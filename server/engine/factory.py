"""The one way to build an engine: load the model, size the cache, assemble the parts.

`load_engine(args)` returns a synchronous `LLMEngine` on the calling thread (tests, benchmarks);
`start_engine(args)` runs the same on a dedicated engine thread and returns the `AsyncEngine`
client the server uses.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import mlx.core as mx

from .architectures import adapt_model
from .args import EngineArgs
from .async_engine import AsyncEngine, run_follower
from .distributed import EventChannel, shard_model
from .llm_engine import LLMEngine
from .loader import load_model
from .model_runner import ModelRunner, cache_bytes_per_token

log = logging.getLogger(__name__)


def load_engine(
    args: EngineArgs, loaded: tuple[Any, Any] | None = None, group: mx.distributed.Group | None = None
) -> LLMEngine:
    """An engine for `args.model` (None: the embedded demo model).

    `loaded` is an already loaded (model, tokenizer) pair to reuse instead (tests load the demo
    model once). With `group`, the model is sharded across its ranks (distributed.py). The
    returned engine's `args` are resolved: `max_model_len` is the model's limit or less, and the
    cache holds at least one full-length sequence.
    """
    if loaded is None:
        from .demo_model import ensure_demo_model

        loaded = load_model(args.model or str(ensure_demo_model()))
    model, tokenizer = loaded
    if group is not None:
        shard_model(model, group)
    model = adapt_model(model)  # architectures.py: refuses unsupported types, adapts the rest
    limit: int = model.args.max_position_embeddings
    max_model_len = min(args.max_model_len or limit, limit)
    layers = len(model.model.layers)
    per_token = cache_bytes_per_token(model)
    tokens = args.cache_tokens or _tokens_by_memory(args, per_token, max_model_len)
    num_blocks = -(-tokens // args.block_size)
    if num_blocks * args.block_size < max_model_len:
        log.warning("cache holds %d tokens: max_model_len lowered from %d", num_blocks * args.block_size, max_model_len)
        max_model_len = num_blocks * args.block_size
    resolved = replace(
        args,
        max_model_len=max_model_len,
        cache_tokens=num_blocks * args.block_size,
        # Every running sequence must be able to decode in the same step.
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
    )
    runner = ModelRunner(model, num_blocks=num_blocks, block_size=args.block_size)
    log.info(
        "latent cache: %d tokens (%d blocks of %d), %.1f MiB over %d layers (%d bytes/token/layer, INT4)",
        resolved.cache_tokens,
        num_blocks,
        args.block_size,
        runner.cache_bytes / 2**20,
        layers,
        per_token // layers,
    )
    return LLMEngine(runner, tokenizer, resolved)


def start_engine(args: EngineArgs, group: mx.distributed.Group | None = None) -> AsyncEngine:
    """Load and run the engine on its own thread (MLX arrays belong to the thread that made them).
    With `group`, this is rank 0 of a tensor-parallel set: it shares each turn's events."""
    channel = EventChannel(group) if group is not None else None
    return AsyncEngine(lambda: load_engine(args, group=group), channel)


def follow(args: EngineArgs, group: mx.distributed.Group) -> None:
    """A rank other than 0: load and shard the same engine, then run rank 0's steps until it stops."""
    run_follower(load_engine(args, group=group), EventChannel(group))


def _tokens_by_memory(args: EngineArgs, bytes_per_token: int, max_model_len: int) -> int:
    """A share of free memory, never more than `max_num_seqs` full-length sequences could use."""
    ceiling = args.max_num_seqs * max_model_len
    by_memory = int(_free_memory_bytes() * args.cache_memory_fraction) // bytes_per_token
    return max(args.block_size, min(ceiling, by_memory))


def _free_memory_bytes() -> int:
    info = mx.device_info()
    total = info.get("max_recommended_working_set_size") or info.get("memory_size")
    if isinstance(total, int) and total:
        return max(0, total - mx.get_active_memory())
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30
