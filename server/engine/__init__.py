"""The engine: loads an MLA model and serves generation requests from one thread.

`build_engine(settings)` is the one entry point the rest of the server uses.
"""

from __future__ import annotations

import logging
from .types import EngineClient, EngineError

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "mla-demo"


def build_engine(settings) -> EngineClient:
    """Load `settings.model` (None = the embedded demo model) and start the engine thread."""
    from .async_engine import AsyncEngine
    from .demo_model import ensure_demo_model
    from .llm_engine import EngineConfig, LLMEngine
    from .loader import BLOCK_SIZE, cache_tokens_for, load_model
    from .model_runner import ModelRunner

    model_ref = settings.model or str(ensure_demo_model())

    def make_engine() -> LLMEngine:
        model, tokenizer = load_model(model_ref)
        args = model.args
        max_model_len = min(settings.max_model_len or args.max_position_embeddings, args.max_position_embeddings)

        probe = ModelRunner(model, num_blocks=1, block_size=BLOCK_SIZE)
        per_token = probe.cache_bytes // BLOCK_SIZE
        del probe
        tokens = cache_tokens_for(settings, per_token, max_model_len)
        num_blocks = -(-tokens // BLOCK_SIZE)
        if num_blocks * BLOCK_SIZE < max_model_len:
            log.warning("cache holds %d tokens: max_model_len lowered from %d", num_blocks * BLOCK_SIZE, max_model_len)
            max_model_len = num_blocks * BLOCK_SIZE
        runner = ModelRunner(model, num_blocks=num_blocks, block_size=BLOCK_SIZE)
        log.info(
            "latent cache: %d tokens (%d blocks of %d), %.1f MiB over %d layers (%d bytes/token/layer, INT4)",
            num_blocks * BLOCK_SIZE, num_blocks, BLOCK_SIZE, runner.cache_bytes / 2**20,
            len(runner.caches), per_token // len(runner.caches),
        )
        config = EngineConfig(
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=max(settings.max_num_batched_tokens, settings.max_num_seqs),
            prefill_chunk_size=settings.prefill_chunk_size,
            max_model_len=max_model_len,
        )
        return LLMEngine(runner, tokenizer, config, num_blocks)

    name = settings.served_model_name or settings.model or DEMO_MODEL_NAME
    return AsyncEngine(make_engine, name, request_timeout=settings.request_timeout)


__all__ = ["build_engine", "EngineClient", "EngineError"]
