"""The engine: loads an MLA model and serves generation requests from one thread.

`factory.start_engine(EngineArgs(...))` is how the server gets one; `factory.load_engine` gives
tests and benchmarks the same engine without the thread. This package imports no HTTP code, and
importing it loads no MLX: the API layer uses only `args` and `types`.
"""

from .args import DEMO_MODEL_NAME, EngineArgs
from .types import EngineClient, EngineError

__all__ = ["DEMO_MODEL_NAME", "EngineArgs", "EngineClient", "EngineError"]
