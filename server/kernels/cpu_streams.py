"""Independent parts of a CPU computation on several CPU streams, so that they use several cores.

Why: MLX's CPU backend runs each op on one thread (its Linux wheel bundles the single-threaded
reference BLAS), so one graph uses one core however many the machine has; ops on different CPU
streams run on different threads. Parts that share no output (the sequences of a decode batch,
the query blocks of a prefill chunk) can each go to a stream of their own; MLX orders a part
after the arrays it reads, whichever stream made them.

The streams are per thread (MLX streams are used by the thread that made them) and made on first
use: the calling thread's default CPU stream is the first, plus one more per further core, at
most `MAX_STREAMS`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence

import mlx.core as mx

MAX_STREAMS = 8

_local = threading.local()


def _extra_streams() -> list[mx.Stream]:
    streams: list[mx.Stream] | None = getattr(_local, "streams", None)
    if streams is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        streams = [mx.new_stream(mx.cpu) for _ in range(min(MAX_STREAMS, cores) - 1)]
        _local.streams = streams
    return streams


def num_cpu_streams() -> int:
    """How many parts `run_parts` runs at once on this thread (1 where there is one core)."""
    return 1 + len(_extra_streams())


def run_parts(parts: Sequence[Callable[[], mx.array]]) -> list[mx.array]:
    """Build each part's graph on its own CPU stream, round robin (the first on the caller's
    default stream); returns their outputs in order, unevaluated."""
    streams = [None, *_extra_streams()]
    outs = []
    for i, part in enumerate(parts):
        stream = streams[i % len(streams)]
        if stream is None:
            outs.append(part())
        else:
            with mx.stream(stream):
                outs.append(part())
    return outs
