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
    # Most sequences running (decoding or prefilling) at once; None: 64 on a GPU, 16 on the CPU,
    # whose decode throughput grows little past 16 (docs/serving.md), so more would only stretch
    # every stream's inter-token latency. `factory.load_engine` resolves it.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int = 2048  # most tokens (decode + prefill) in one step
    # Most prompt tokens of one sequence in one step; None: by device, `factory.load_engine`
    # resolves it (2048 on CUDA, where a lone 8K prompt reached its first token 1.6x sooner than
    # with 512; 512 on the CPU, where 2048-token steps ran 24% slower per token, and on Metal,
    # not measured). In a step that also decodes `max_prefill_tokens_per_step` bounds it.
    prefill_chunk_size: int | None = None
    # Most prompt tokens (all prefills together) in a step that also decodes; None: no cap beyond
    # max_num_batched_tokens. A step with nothing to decode prefills up to max_num_batched_tokens.
    max_prefill_tokens_per_step: int | None = 512
    # While sequences decode, prefill only as many tokens as keep a step near this many
    # milliseconds (from measured step times; at least one block's worth); None: off.
    target_step_ms: float | None = None
    # Build each step while the device still runs the previous one, so the host's work overlaps
    # the device's (LLMEngine.step): "on", or "off" (one step at a time; always, under tensor
    # parallelism, where every rank must take each turn's events at the same point of its steps).
    async_scheduling: str = "on"
    max_model_len: int | None = None  # prompt + completion; None: the model's own limit
    cache_tokens: int | None = None  # latent cache capacity; None: sized by the fraction below
    cache_memory_fraction: float = 0.5  # share of free device memory for the cache
    # The default cache holds max_num_seqs sequences of this many tokens (at least one
    # max_model_len sequence), within cache_memory_fraction; cache_tokens overrides both.
    cache_tokens_per_seq: int = 8192
    # Run the decode batch sizes and prefill chunk lengths the engine will use once before it is
    # returned (MLX's GPU backends compile kernels on first use of each shape): "on", "off", or
    # "auto" (on a GPU only).
    warmup: str = "auto"
    # Processes that compile MLX's costliest kernels in parallel before the engine's own warm-up,
    # when the kernel cache is empty (warmup.py); None: on CUDA one per unit (7) as cores and
    # memory allow, elsewhere 0.
    warmup_workers: int | None = None
    # Which decode attention runs: "auto" (the fused kernel on Metal or CUDA, checked against the
    # reference when the engine loads; "cpu" on the CPU), "reference", "cpu" (plain MLX over the
    # packed INT4 codes), "metal" or "cuda" (kept even if the check fails).
    decode_backend: str = "auto"
    # Routed experts one expert at a time: "auto" (CUDA, 3+ rows per expert on average), "on" or "off".
    moe_by_expert: str = "auto"
    # Prefill attention at bucketed lengths (mla_attention.sdpa_layout): "auto" (CUDA, where SDPA
    # builds a cuDNN graph for each new shape, for the head sizes cuDNN takes), "on" or "off".
    prefill_buckets: str = "auto"
    block_size: int = 64  # tokens per cache block
    # The latent cache: "int4" (MLX affine 4-bit, group 64, plus the rope key) or "bf16" (unquantized,
    # 2.35x the bytes for Mistral Small 4: when quality must be bit-comparable; docs/quality.md).
    latent_cache: str = "int4"
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
    def max_running(self) -> int:
        """`max_num_seqs`, resolved (`factory.load_engine` does it; builders of engines by hand
        name it)."""
        if self.max_num_seqs is None:
            raise ValueError("EngineArgs.max_num_seqs must be resolved before the engine uses it")
        return self.max_num_seqs

    @property
    def prefill_chunk(self) -> int:
        """`prefill_chunk_size`, resolved (as `max_running`)."""
        if self.prefill_chunk_size is None:
            raise ValueError("EngineArgs.prefill_chunk_size must be resolved before the engine uses it")
        return self.prefill_chunk_size

    @property
    def max_requests(self) -> int:
        """Requests the engine holds at once, running and waiting; more are refused."""
        waiting = 4 * self.max_running if self.max_waiting_requests is None else self.max_waiting_requests
        return self.max_running + waiting
