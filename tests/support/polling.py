"""Polling a condition: the one loop tests use to wait for something to become true."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout: float = 3.0, interval: float = 0.01) -> bool:
    """True as soon as `condition()` is truthy; False if it is still falsy after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
