"""Pretend this process runs on another machine: the one seam for every device-dependent choice
(`server.platform`, whose detected platform it replaces for one test)."""

from __future__ import annotations

import pytest

from server import platform
from server.platform import Platform


def pretend(monkeypatch: pytest.MonkeyPatch, backend: str, device_name: str = "", memory: int = 0) -> Platform:
    """Make `current_platform()` answer `backend` ("metal", "cuda" or "cpu") until the test ends.

    What is made while pretending follows the pretended device (the demo model is bf16 on a GPU):
    load what the test computes with first (`engine_harness.demo_engine_model()`)."""
    pretended = Platform(backend, device_name, memory)
    monkeypatch.setattr(platform, "_current", pretended)
    return pretended
