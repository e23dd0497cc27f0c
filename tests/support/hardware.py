"""Which tests the hardware under the suite lets hold.

On CPU the decode step is plain MLX (server/kernels/cpu_decode.py: the reference's arithmetic in
float32, over the packed INT4 codes), deterministic and independent of the batch, so greedy
tokens equal a reference loop's (mlx-lm's own forward pass): alone and in any batch, before and
after preemption. On a GPU the fused kernel runs
instead; it matches the reference to within bf16 rounding (docs/kernels.md), and its split-K
configuration depends on the batch, so an argmax between two near-equal logits may flip. Tests of
exact token equality are skipped there; tests of memory, bookkeeping and the API are not.
"""

from __future__ import annotations

import pytest

from server.kernels.mla_decode import FUSED
from server.platform import current_platform


def on_fused_kernel() -> bool:
    """True when the default device runs the fused Metal or CUDA decode kernel."""
    return current_platform().defaults.decode_backend in FUSED


needs_reference_decode = pytest.mark.skipif(
    on_fused_kernel(),
    reason="exact token equality needs the reference decode (CPU); the fused GPU kernel rounds differently",
)
