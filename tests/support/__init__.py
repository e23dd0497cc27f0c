"""What several test modules need, each in one place.

- `free_port`: a free local TCP port (the benchmark's own helper, `server.bench.servers.free_port`).
- `wait_until`: poll a condition until it holds or time runs out.
- `sse`: the one parser of `data:` lines of a server-sent-event stream.
- `RemoteServer`: `python -m server` (or any python program) as a child process on a free port.
- `WordTokenizer`: a tiny tokenizer whose tokens are whole words (for the fake engine and tests).
- `support.hardware`: the hardware condition under which exact-token equality tests cannot hold
  (imported on its own: it loads MLX, which the API tests do without).
- `support.platforms.pretend`: run a test as if on another device (CUDA, Metal, the CPU).

Test modules import it as `support` (pytest puts tests/ on sys.path: `pythonpath` in pyproject.toml).
"""

from __future__ import annotations

from server.bench.servers import free_port

from .polling import wait_until
from .remote import RemoteServer
from .sse import iter_sse, sse_events
from .words import WordTokenizer

__all__ = [
    "RemoteServer",
    "WordTokenizer",
    "free_port",
    "iter_sse",
    "sse_events",
    "wait_until",
]
