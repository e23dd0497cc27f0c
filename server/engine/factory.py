"""The one way to build an engine: load and adapt the model, choose its decode backend, size the
cache, assemble the parts, warm up.

The prefix cache's disk tier (disk_cache.py) is attached last, only to an engine whose model was
loaded from a directory here (its files are the model's identity), and never under tensor
parallelism (every rank would have to read the same blocks at the same step).

`load_engine(args)` returns a synchronous `LLMEngine` on the calling thread (tests, benchmarks);
`start_engine(args)` runs the same on a dedicated engine thread and returns the `AsyncEngine`
client the server uses (it is ready, and /health answers, only once `load_engine` returned).

Memory: on Apple silicon the model and the cache pool are wired (kept resident) up to the GPU's
recommended working set, as mlx-lm does, and the pool is sized from what remains of it after the
model; a model that leaves no room for a minimal pool is refused with a clear error.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..kernels.selfcheck import Verdict
from ..platform import current_platform
from .args import EngineArgs
from .async_engine import AsyncEngine, run_follower
from .disk_cache import DiskCache, default_directory, default_max_bytes, model_fingerprint
from .distributed import EventChannel, shard_model
from .llm_engine import DiskTier, LLMEngine
from .model.architectures import adapt_model
from .model.loader import load_model
from .model.model_runner import ModelRunner, cache_bytes_per_token, check_decode
from .types import EngineError
from .warmup import Precompile, warm_up, warmup_units

log = logging.getLogger(__name__)


def with_device_defaults(args: EngineArgs) -> EngineArgs:
    """`args` with the options left unset resolved for this platform (`platform.DEFAULTS`):
    `max_num_seqs`, `prefill_chunk_size`."""
    defaults = current_platform().defaults
    return replace(
        args,
        max_num_seqs=args.max_num_seqs or defaults.max_num_seqs,
        prefill_chunk_size=args.prefill_chunk_size or defaults.prefill_chunk_size,
    )


def engine_model(model: Any, group: mx.distributed.Group | None = None) -> Any:
    """The model mlx-lm loaded, made the engine's: sharded across `group`'s ranks (distributed.py),
    then adapted (architectures.py: refuses unsupported types, adapts the rest). In place, once."""
    if group is not None:
        shard_model(model, group)
    return adapt_model(model)


def load_engine(
    args: EngineArgs, loaded: tuple[Any, Any] | None = None, group: mx.distributed.Group | None = None
) -> LLMEngine:
    """An engine for `args.model` (None: the embedded demo model), checked and warmed up.

    `loaded` is an engine model (`engine_model`) and its tokenizer to reuse instead (tests and
    benchmarks build several engines on one). With `group`, the model loaded is sharded across its
    ranks. The returned engine's `args` are resolved: `max_model_len` is the model's limit or less,
    and the cache holds at least one full-length sequence.
    """
    args = with_device_defaults(args)
    warm = args.warmup == "on" or (args.warmup == "auto" and current_platform().defaults.warmup)
    name, hub = None, None
    if loaded is None:
        from .model.demo_model import ensure_demo_model

        name = args.model or str(ensure_demo_model())
        if not Path(name).expanduser().exists():
            hub = load_model(name)  # a hub id: downloaded before compile workers read it
    # Compile workers (warmup.py) run while this process reads the weights.
    with Precompile.start(args, name if warm and group is None else None) as precompile:
        if loaded is None:
            model, tokenizer = hub or load_model(str(name))
            loaded = engine_model(model, group), tokenizer
        precompile.join()
    # The fused decode kernel against the reference on this model's shapes, after the workers
    # compiled its kernels; on a failure the engine decodes through the reference, and /health says so.
    decode = check_decode(loaded[0], args)
    engine = _assemble(args, loaded, decode, group)
    if warm:
        t0 = time.perf_counter()
        steps = warm_up(engine, warmup_units(engine.args, engine.max_model_len))
        log.info("warm-up: %d steps over the step shapes in %.1f s", steps, time.perf_counter() - t0)
    disk = _disk_tier(engine, name, hub) if name is not None and group is None else None
    if warm or disk is not None:
        # Fresh counters, scheduler and prefix cache; the disk tier only now, so warm-up writes none.
        engine = LLMEngine(engine.runner, engine.tokenizer, engine.args, decode=engine.decode, disk=disk)
    return engine


def _disk_tier(engine: LLMEngine, name: str, hub: tuple[Any, Any] | None) -> DiskTier | None:
    """The disk tier `engine.args` ask for, for the model loaded from `name`; None when off."""
    args = engine.args
    directory = Path(args.disk_cache_dir).expanduser() if args.disk_cache_dir else default_directory()
    max_bytes = default_max_bytes(directory) if args.disk_cache_bytes is None else args.disk_cache_bytes
    if max_bytes == 0:
        return None
    model_dir = Path(name).expanduser()
    if hub is not None:
        from mlx_lm.utils import hf_repo_to_path

        model_dir = Path(hf_repo_to_path(name))  # type: ignore[no-untyped-call]  # the snapshot load_model read
    runner = engine.runner
    assert isinstance(runner, ModelRunner)
    layout = f"{args.latent_cache}:{runner.dtype}:{args.block_size}:" + ",".join(
        f"{a.dtype}{a.shape[1:]}" for a in runner.cache_arrays()
    )
    try:
        cache = DiskCache(directory, max_bytes, runner.block_nbytes)
    except OSError as exc:
        log.warning("prefix cache disk tier off: %s: %s", directory, exc)
        return None
    log.info("prefix cache disk tier: %s, %.1f GiB at most", directory, cache.max_bytes / 2**30)
    return DiskTier(cache, model_fingerprint(model_dir, layout))


def _assemble(
    args: EngineArgs, loaded: tuple[Any, Any], decode: Verdict, group: mx.distributed.Group | None
) -> LLMEngine:
    """The engine for an engine model and its tokenizer, decoding as `decode` says, its cache
    sized and the options that depend on the model resolved."""
    model, tokenizer = loaded
    limit: int = model.args.max_position_embeddings
    max_model_len = min(args.max_model_len or limit, limit)
    layers = len(model.model.layers)
    per_token = cache_bytes_per_token(model, args.latent_cache)
    _wire()
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
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_running),
        async_scheduling="off" if group is not None else args.async_scheduling,
    )
    runner = ModelRunner(
        model,
        num_blocks=num_blocks,
        decode_backend=decode.backend,
        block_size=args.block_size,
        latent_cache=args.latent_cache,
        moe_by_expert=args.moe_by_expert,
        prefill_buckets=args.prefill_buckets,
        sharded=group is not None,
    )
    log.info(
        "latent cache: %d tokens (%d blocks of %d), %.1f MiB over %d layers (%d bytes/token/layer, %s)",
        resolved.cache_tokens,
        num_blocks,
        args.block_size,
        runner.cache_bytes / 2**20,
        layers,
        per_token // layers,
        args.latent_cache.upper(),
    )
    return LLMEngine(runner, tokenizer, resolved, decode=decode.as_dict())


def start_engine(args: EngineArgs, group: mx.distributed.Group | None = None) -> AsyncEngine:
    """Load and run the engine on its own thread (MLX arrays belong to the thread that made them).
    With `group`, this is rank 0 of a tensor-parallel set: it shares each turn's events."""
    channel = EventChannel(group) if group is not None else None
    return AsyncEngine(lambda: load_engine(args, group=group), channel)


def follow(args: EngineArgs, group: mx.distributed.Group) -> None:
    """A rank other than 0: load and shard the same engine, then run rank 0's steps until it stops."""
    run_follower(load_engine(args, group=group), EventChannel(group))


def _wire() -> None:
    """On Apple silicon, wire memory up to the recommended working set, as mlx-lm does
    (`maybe_set_recommended_wired_limit`), so macOS does not page out the model or the pool."""
    platform = current_platform()
    if platform.backend == "metal" and platform.memory:
        mx.set_wired_limit(platform.memory)


def _tokens_by_memory(args: EngineArgs, bytes_per_token: int, max_model_len: int) -> int:
    """What the workload needs (`max_num_seqs` sequences of `cache_tokens_per_seq` tokens, and at
    least one of `max_model_len`), within a share of the memory the model leaves free.

    Refuses (EngineError) when the memory left cannot hold even a minimal pool: one block per
    running sequence plus one sequence of min(max_model_len, 4096) tokens."""
    want = max(max_model_len, args.max_running * min(args.cache_tokens_per_seq, max_model_len))
    free = _free_memory_bytes()
    minimum = args.max_running * args.block_size + min(max_model_len, 4096)
    if free < minimum * bytes_per_token:
        raise EngineError(
            f"not enough memory for the latent cache: the model leaves {free / 2**20:.0f} MiB of the "
            f"device's working set, and a minimal cache ({minimum} tokens, {bytes_per_token} bytes each) "
            f"needs {minimum * bytes_per_token / 2**20:.0f} MiB; use a smaller model or quantization, "
            "a lower --max-num-seqs, or a machine with more memory"
        )
    by_memory = int(free * args.cache_memory_fraction) // bytes_per_token
    return max(args.block_size, minimum if by_memory < minimum else min(want, by_memory))


def _free_memory_bytes() -> int:
    total = current_platform().memory
    if total:
        return max(0, total - mx.get_active_memory())
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30
