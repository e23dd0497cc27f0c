"""One request's state inside the engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING

from .types import SamplingParams, StreamDelta

if TYPE_CHECKING:
    from .detokenizer import TokenStream
    from .sampling import SamplerState


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
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    # Prompt then output, kept as one list so a step reads it without rebuilding it.
    token_ids: list[int] = field(init=False)
    # Tokens whose latents are in the cache (prefix hits included).
    num_computed: int = 0
    num_cached_prompt: int = 0
    block_table: list[int] = field(default_factory=list)
    sampler: SamplerState | None = None
    output: TokenStream | None = None  # when the output ends, and the text each token releases

    def __post_init__(self) -> None:
        self.token_ids = self.prompt_ids + self.output_ids

    def append(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.token_ids.append(token_id)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self) - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_remaining > 1
