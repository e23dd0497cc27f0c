"""`EngineArgs`: every engine and scheduler option, declared once with its default, help and rule.

The server's settings (server/config.py) take every field declared with `option` as a flag, a
TOML key and an environment variable; the rest (`block_size`, `enable_prefix_caching`) only tests
and benchmarks set. The defaults that depend on the device are stated in `server.platform.DEFAULTS`
and only named here, in the help texts written from them. `factory.load_engine` resolves the
options that depend on the device or the model and hands the resolved copy to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import NON_NEGATIVE, POSITIVE, one_of, option
from ..platform import by_backend, where

DEMO_MODEL_NAME = "mla-demo"


@dataclass(frozen=True)
class EngineArgs:
    model: str | None = option(
        None, "local directory or Hugging Face repo id of an MLA model (unset: the embedded demo model)"
    )
    served_model_name: str | None = option(None, "model name clients send and see (unset: derived from --model)")
    # Running sequences (decoding or prefilling); past the CPU's default a stream's inter-token
    # latency grows for little more throughput (docs/serving.md).
    max_num_seqs: int | None = option(
        None, f"most sequences decoded together in one batch (unset: {by_backend('max_num_seqs')})", **POSITIVE
    )
    max_num_batched_tokens: int = option(
        2048, "most tokens (prefill + decode) processed in one engine step", **POSITIVE
    )
    # In a step that also decodes, `max_prefill_tokens_per_step` bounds it.
    prefill_chunk_size: int | None = option(
        None,
        f"prompt tokens prefilled per sequence per engine step (unset: {by_backend('prefill_chunk_size')})",
        **POSITIVE,
    )
    # A step with nothing to decode prefills up to max_num_batched_tokens.
    max_prefill_tokens_per_step: int | None = option(
        512,
        "most prompt tokens prefilled in a step that also decodes (unset: up to --max-num-batched-tokens)",
        **POSITIVE,
    )
    # From measured step times; at least one block's worth.
    target_step_ms: float | None = option(
        None,
        "while sequences decode, prefill only as much per step as keeps a step near this many ms (unset: off)",
        **POSITIVE,
    )
    # LLMEngine.step; always off under tensor parallelism, where every rank must take each turn's
    # events at the same point of its steps.
    async_scheduling: str = option(
        "on",
        "build each engine step while the device still runs the previous one (host and device work overlap): on or off",
        **one_of("on", "off"),
    )
    max_model_len: int | None = option(
        None, "longest prompt + completion in tokens (unset: the model's own limit)", **POSITIVE
    )
    cache_tokens: int | None = option(
        None, "latent cache capacity in tokens (unset: sized by --cache-memory-fraction)", **POSITIVE
    )
    cache_memory_fraction: float = option(
        0.5,
        "share of device memory given to the latent cache when --cache-tokens is unset",
        lambda v: 0 < v <= 1,
        "must be in (0, 1]",
    )
    # The default cache holds max_num_seqs sequences of this many tokens (at least one
    # max_model_len sequence), within cache_memory_fraction; cache_tokens overrides both.
    cache_tokens_per_seq: int = option(
        8192,
        "tokens per running sequence the default cache is sized for (within --cache-memory-fraction)",
        **POSITIVE,
    )
    # MLX's GPU backends compile kernels on first use of each shape (warmup.py).
    warmup: str = option(
        "auto",
        f"run the engine's step shapes once before serving: on, off, or auto (on {where('warmup')} only)",
        **one_of("auto", "on", "off"),
    )
    warmup_workers: int | None = option(
        None,
        "processes compiling MLX's costliest kernels in parallel on an empty kernel cache (unset: on "
        f"{where('compile_workers')} as many as cores and memory allow, else 0)",
        **NON_NEGATIVE,
    )
    # "cuda" or "metal" keeps the fused kernel even if its check fails (kernels/selfcheck.py).
    decode_backend: str = option(
        "auto",
        f"decode attention: auto ({by_backend('decode_backend')}; a fused kernel is checked at load), reference,"
        " cpu, metal or cuda",
        **one_of("auto", "reference", "cpu", "metal", "cuda"),
    )
    moe_by_expert: str = option(
        "auto",
        f"run routed experts one expert at a time: auto ({where('moe_by_expert')}, batches giving each expert 3+"
        " rows on average), on or off",
        **one_of("auto", "on", "off"),
    )
    # mla_attention.sdpa_layout: SDPA on CUDA builds a cuDNN graph for each new shape.
    prefill_buckets: str = option(
        "auto",
        "pad prefill attention to bucketed lengths, so CUDA builds a bounded set of cuDNN graphs: auto"
        f" ({where('prefill_buckets')}, heads cuDNN takes), on or off",
        **one_of("auto", "on", "off"),
    )
    # spec_decode/speculator.py; exact at any temperature. "mtp" (the models' own heads) is to come.
    speculative: str = option(
        "off",
        "speculative decoding: off, or ngram (prompt lookup: draft from the sequence's own earlier tokens)",
        **one_of("off", "ngram"),
    )
    num_speculative_tokens: int = option(
        3, "most tokens a sequence drafts per step (fewer after its drafts miss)", **POSITIVE
    )
    speculative_max_batch: int = option(
        4, "no sequence drafts while more than this many run (a large batch is compute-bound)", **POSITIVE
    )
    block_size: int = 64  # tokens per cache block
    # bf16: 2.35x the bytes for Mistral Small 4, when quality must be bit-comparable (docs/quality.md).
    latent_cache: str = option(
        "int4",
        "the latent cache: int4 (MLX 4-bit, 272 bytes/token/layer for Mistral Small 4) or bf16 (unquantized, 640)",
        **one_of("int4", "bf16"),
    )
    enable_prefix_caching: bool = True
    # disk_cache.py; unset bytes: 32 GiB, or a tenth of the disk's free space where that is less.
    disk_cache_dir: str | None = option(
        None, "directory of the prefix cache's disk tier (unset: prefix-cache/ under the server's cache directory)"
    )
    disk_cache_bytes: int | None = option(
        None,
        "most bytes the prefix cache's disk tier keeps, least recently used evicted; 0 turns it off "
        "(unset: 32 GiB or a tenth of the disk's free space, whichever is less)",
        **NON_NEGATIVE,
    )
    request_timeout: float = option(600.0, "seconds a request may run before it is ended", **POSITIVE)
    # A turn normally takes one step; the first waits for every rank to load.
    rank_timeout: float = option(
        120.0,
        "tensor parallel: seconds rank 0 waits for the other ranks in one step before it stops the set",
        **POSITIVE,
    )
    max_waiting_requests: int | None = option(
        None,
        "requests queued beyond the running ones before new ones get 429 (unset: 4 x --max-num-seqs)",
        **NON_NEGATIVE,
    )
    # It still stops at the context's end.
    default_max_tokens: int = option(4096, "completion tokens of a request that sets no max_tokens", **POSITIVE)

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
