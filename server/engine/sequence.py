"""One request's state inside the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Callable

from .types import SamplingParams, StreamDelta


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[StreamDelta | Exception], None]
    deadline: float = float("inf")
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    # Tokens whose latents are in the cache (prefix hits included).
    num_computed: int = 0
    num_cached_prompt: int = 0
    block_table: list[int] = field(default_factory=list)
    sampler: Any = None
    detokenizer: Any = None
    finish_reason: str | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self) - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_remaining > 1
