"""`EngineArgs`: every engine and scheduler option, with its default, in one place.

The server's settings (server/config.py) take their defaults from here and map onto it; tests
and benchmarks build it directly. `factory.load_engine` resolves the options that depend on the
model (`max_model_len`, `cache_tokens`) and hands the resolved copy to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

DEMO_MODEL_NAME = "mla-demo"


@dataclass(frozen=True)
class EngineArgs:
    model: str | None = None  # local directory or Hugging Face repo id; None: the demo model
    served_model_name: str | None = None  # what clients send and see; None: derived from `model`
    max_num_seqs: int = 64  # most sequences running (decoding or prefilling) at once
    max_num_batched_tokens: int = 2048  # most tokens (decode + prefill) in one step
    prefill_chunk_size: int = 512  # most prompt tokens of one sequence in one step
    max_model_len: int | None = None  # prompt + completion; None: the model's own limit
    cache_tokens: int | None = None  # latent cache capacity; None: sized by the fraction below
    cache_memory_fraction: float = 0.5  # share of free device memory for the cache
    block_size: int = 64  # tokens per cache block
    enable_prefix_caching: bool = True
    request_timeout: float = 600.0  # seconds a request may run
    # Tensor parallel: seconds rank 0 waits for the other ranks in one turn before it declares one
    # of them dead (a turn normally takes one step; the first waits for every rank to load).
    rank_timeout: float = 120.0
    # Requests queued beyond the running ones before new ones are refused (429); None: 4 x max_num_seqs.
    max_waiting_requests: int | None = None
    # Completion length of a request that names none (it still stops at the context's end).
    default_max_tokens: int = 4096

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model or DEMO_MODEL_NAME

    @property
    def max_requests(self) -> int:
        """Requests the engine holds at once, running and waiting; more are refused."""
        waiting = 4 * self.max_num_seqs if self.max_waiting_requests is None else self.max_waiting_requests
        return self.max_num_seqs + waiting
