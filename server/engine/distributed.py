"""Tensor-parallel serving over mx.distributed: every rank runs the same engine steps on its shard.

Launched with `mlx.launch` (ring on CPUs or Thunderbolt, jaccl, nccl on CUDA), each process loads
the model and shards it with mlx-lm's own `model.shard(group)`: attention heads and experts split
across ranks, the layers' own all-reduces joining them. MLA's latent is shared by all heads, so
tensor parallelism does not shrink the latent cache: each rank holds the whole pool.

Rank 0 serves HTTP and is the only source of events: requests added, aborted or expired, and the
stop. Each turn of its engine loop it broadcasts the turn's events (`EventChannel.exchange`), and
every rank applies the same events to its own `LLMEngine` and runs the same step. Scheduling,
sampling (keyed by each request's seed, which rank 0 fixes for unseeded requests) and constraint
masks are deterministic, and the layers' all-reduces give every rank the same logits, so every
rank agrees on every token without a further exchange.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import numpy as np

from .types import SamplingParams


@dataclass(frozen=True)
class AddRequest:
    """A request as every rank sees it: no callback, and a seed fixed by rank 0."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


# An event: ("add", AddRequest) | ("abort", request id) | ("expire", request id) | ("stop", None).
Event = tuple[str, Any]


class EventChannel:
    """Rank 0's events of one engine turn, delivered to every rank of `group`."""

    def __init__(self, group: mx.distributed.Group) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()

    def exchange(self, events: list[Event]) -> list[Event]:
        """Rank 0 passes its events and gets them back; other ranks pass [] and get rank 0's.
        Blocks until every rank has called it (the followers wait here while rank 0 is idle)."""
        payload = pickle.dumps(events) if self.rank == 0 else b""
        # Two all-reduces: the length, then the bytes (every other rank adds zeros).
        length = mx.distributed.all_sum(mx.array([len(payload)], mx.int32), group=self.group)
        n = int(np.asarray(length)[0])
        mine = mx.array(np.frombuffer(payload, np.uint8)) if self.rank == 0 else mx.zeros((n,), mx.uint8)
        data = mx.distributed.all_sum(mine, group=self.group)
        received: list[Event] = pickle.loads(np.asarray(data).tobytes())
        return received


def with_fixed_seed(params: SamplingParams) -> SamplingParams:
    """An unseeded request gets a seed, so that every rank draws the same tokens for it."""
    return params if params.seed is not None else replace(params, seed=random.getrandbits(63))


def shard_model(model: Any, group: mx.distributed.Group) -> None:
    """Split the model's heads and experts across `group` with mlx-lm's own sharding."""
    if not hasattr(model, "shard"):
        raise ValueError(f"mlx-lm's {type(model).__module__} model cannot be sharded (it has no shard())")
    model.shard(group)
