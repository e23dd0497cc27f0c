"""One request's state inside the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING

import mlx.core as mx

from ..types import Emit, SamplingParams

if TYPE_CHECKING:
    from ..output.detokenizer import TokenStream
    from ..sample.sampling import SamplerState


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Emit
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    # Prompt then output, kept as one list so a step reads it without rebuilding it.
    token_ids: list[int] = field(init=False)
    # Tokens whose latents are in the cache (prefix hits included).
    num_computed: int = 0
    num_cached_prompt: int = 0
    block_table: list[int] = field(default_factory=list)
    # Leading blocks of `block_table` registered as cached prefix blocks (BlockManager.commit).
    num_committed_blocks: int = 0
    # Tokens drawn by steps the engine has built but not read back yet (LLMEngine.step; a step may
    # draw several for one sequence): `len(seq)` counts them, `token_ids` does not. `pending` is
    # (draws, row): the newest one, the next decode's input, is `draws[row]`, still on the device.
    num_pending: int = 0
    pending: tuple[mx.array, int] | None = None
    sampler: SamplerState | None = None
    # Tokens drafted to follow the newest one, which the next decode verifies with it, and the
    # most it may draft (adapted to its acceptance; 0: not set yet): spec_decode/speculator.py.
    draft: list[int] = field(default_factory=list)
    draft_len: int = 0
    output: TokenStream | None = None  # when the output ends, and the text each token releases

    def __post_init__(self) -> None:
        self.token_ids = self.prompt_ids + self.output_ids

    def append(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.token_ids.append(token_id)

    def __len__(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def num_remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self) - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_remaining > 1

    @property
    def drawn_all(self) -> bool:
        """Every output token it may have is drawn (some maybe still pending): it ends on reading
        them back, so no step runs it further."""
        return self.params.max_tokens is not None and len(self.output_ids) + self.num_pending >= self.params.max_tokens
