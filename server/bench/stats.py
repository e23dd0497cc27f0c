"""Per-request measurements and the summary statistics a load run reports."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """What one streamed request measured; times are seconds on the run's monotonic clock.

    `chunk_times` are arrival times of content-bearing chunks. `output_tokens` comes from the
    server's usage when it sent one, else it is the number of content chunks.
    """

    start: float
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    usage_reported: bool = False
    error: str | None = None  # kind: "http_<status>", "timeout", "connection", "protocol"
    error_detail: str | None = None
    finished: bool = False  # the stream ended with [DONE] and no error

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def inter_token_gaps(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate after the first token; None with fewer than two tokens."""
        if not self.finished or self.output_tokens < 2 or not self.chunk_times or self.end is None:
            return None
        decode_s = self.end - self.chunk_times[0]
        return (self.output_tokens - 1) / decode_s if decode_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("chunk_times")
        d["ttft"] = self.ttft
        d["chunks"] = len(self.chunk_times)
        return d


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    """Aggregate a run: latencies in milliseconds, rates in output tokens per second.

    Aggregate throughput counts every token received in the run, including those of requests
    cut off by the time bound, over the run's wall time.
    """
    ttfts = [r.ttft for r in records if r.ttft is not None]
    gaps = [g for r in records for g in r.inter_token_gaps]
    rates = [x for r in records if (x := r.tokens_per_s) is not None]
    prompts = [r.prompt_tokens for r in records if r.prompt_tokens is not None]
    tokens = sum(r.output_tokens for r in records)
    return {
        "requests": len(records),
        "completed": sum(r.finished for r in records),
        "unfinished": sum(not r.finished and r.error is None for r in records),
        "errors": dict(Counter(r.error for r in records if r.error)),
        "wall_s": wall_s,
        "output_tokens": tokens,
        "mean_prompt_tokens": _mean(prompts),
        "mean_output_tokens": _mean([r.output_tokens for r in records if r.finished]),
        "ttft_ms": {f"p{q}": _ms(percentile(ttfts, q)) for q in (50, 90, 99)},
        "itl_ms": {f"p{q}": _ms(percentile(gaps, q)) for q in (50, 99)},
        "request_tokens_per_s": {
            "mean": _mean(rates),
            "p50": percentile(rates, 50),
        },
        "aggregate_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
    }
