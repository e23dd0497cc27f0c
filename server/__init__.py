"""An OpenAI-compatible server for MLA models on MLX (README.md).

One process-wide setting lives here, because it must precede MLX's start: every entry point
(`python -m server`, the bench, compile workers, tensor-parallel ranks) imports this package
before MLX. MLX's CUDA backend throws once one of its caches (CUDA graphs by topology, cuDNN
attention graphs by shape, ...) has missed more than twice its capacity over the process's
whole life (mlx/backend/cuda/lru_cache.h, MLX 0.32: the count never resets, hits or not), and
the throw ends a process mid-step. A server that runs for days on varied traffic reaches that
count whatever its hit rate, so the check is off here, as MLX's own tests turn it off: the caches
still evict, so a miss costs a rebuild, never the process. A value set by the user wins.
"""

import os

os.environ.setdefault("MLX_ENABLE_CACHE_THRASHING_CHECK", "0")
