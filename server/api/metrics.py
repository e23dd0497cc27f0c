"""/metrics in Prometheus text format (prometheus-client), named after vLLM's metrics.

Engine counts (requests running and waiting, cache usage, prefix-cache hits by tier, the disk
tier's bytes, preemptions, prompt and generation tokens, speculative decoding's drafts) are read
from `engine.stats()` at scrape time, so the engine keeps one set
of counters; the latencies a client sees (time to first token, inter-token latency, end-to-end)
are timed here, per request, by a `RequestTimer`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.types import EngineClient

PREFIX = "mla:"  # vLLM's names under this server's namespace ("vllm:num_requests_running" ...)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; vLLM's buckets, trimmed to the range a local server sees.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class Metrics:
    """One app's registry: latency histograms, and the engine's counters read when scraped."""

    def __init__(self, engine: EngineClient) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            family = Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets, registry=self.registry)
            return family.labels(engine.model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time from request to its first token", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two tokens of a request", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from request to its end", _E2E_BUCKETS)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Times one request: created on arrival; told of its first token, its tokens and its end."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._start = self._last = time.monotonic()
        self._ended = False

    def first_token(self) -> None:
        self._last = time.monotonic()
        self._metrics.ttft.observe(self._last - self._start)

    def tokens(self, count: int) -> None:
        if count:
            now = time.monotonic()
            # A delta of several tokens (after a held-back stop prefix) spreads its gap over them.
            for _ in range(count):
                self._metrics.itl.observe((now - self._last) / count)
            self._last = now

    def finished(self) -> None:
        if not self._ended:
            self._ended = True
            self._metrics.e2e.observe(time.monotonic() - self._start)


class _EngineCollector(Collector):
    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        model = self._engine.model_name

        def gauge(name: str, doc: str, key: str) -> Metric:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([model], float(stats.get(key, 0)))
            return family

        def counter(name: str, doc: str, key: str) -> Metric:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([model], float(stats.get(key, 0)))
            return family

        yield gauge("num_requests_running", "Requests decoding or prefilling", "running")
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled", "waiting")
        yield gauge("kv_cache_usage_perc", "Share of latent cache blocks in use (1 = full)", "cache_usage")
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "prompt_tokens")
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache", "cached_prompt_tokens")
        by_tier = CounterMetricFamily(
            PREFIX + "prefix_cache_hits_by_tier",
            "Prompt tokens found in the prefix cache, by tier",
            labels=["model_name", "tier"],
        )
        disk_hits = float(stats.get("cached_prompt_tokens_disk", 0))
        by_tier.add_metric([model, "memory"], float(stats.get("cached_prompt_tokens", 0)) - disk_hits)
        by_tier.add_metric([model, "disk"], disk_hits)
        yield by_tier
        yield gauge("disk_cache_bytes", "Bytes of the prefix cache's disk tier", "disk_cache_bytes")
        yield counter(
            "disk_cache_bytes_written", "Bytes written to the prefix cache's disk tier", "disk_cache_bytes_written"
        )
        yield counter(
            "disk_cache_writes_dropped",
            "Blocks not written to the disk tier: its writer's queue was full, or the write failed",
            "disk_cache_writes_dropped",
        )
        yield counter(
            "disk_cache_files_rejected",
            "Disk tier files removed unread: torn, truncated, corrupted or another model's",
            "disk_cache_files_rejected",
        )
        yield counter("num_preemptions", "Sequences preempted to free cache blocks", "preemptions")
        yield counter("prompt_tokens", "Prompt tokens of admitted requests", "prompt_tokens")
        yield counter("generation_tokens", "Tokens generated", "generated_tokens")
        # Speculative decoding (vLLM's names); acceptance rate = accepted / draft tokens, mean
        # accepted length = 1 + accepted tokens / drafts (/health reports both).
        yield counter("spec_decode_num_drafts", "Drafts verified", "spec_drafts")
        yield counter("spec_decode_num_draft_tokens", "Drafted tokens verified", "spec_draft_tokens")
        yield counter("spec_decode_num_accepted_tokens", "Drafted tokens accepted", "spec_accepted_tokens")
