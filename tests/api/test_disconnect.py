"""`until_disconnected`: a request's work ends when its client leaves, and only then."""

from __future__ import annotations

import asyncio

import pytest

from server.api.disconnect import ClientDisconnected, until_disconnected


class _Request:
    """What `until_disconnected` reads of a Starlette request: `receive()`, which returns
    `http.disconnect` once the client is gone (after `leave_after` seconds, or never)."""

    def __init__(self, leave_after: float | None) -> None:
        self.leave_after = leave_after

    async def receive(self) -> dict[str, str]:
        if self.leave_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.leave_after or 0)
        return {"type": "http.disconnect"}


@pytest.mark.anyio
async def test_the_work_s_result_when_it_ends_first():
    async def work() -> str:
        await asyncio.sleep(0.01)
        return "done"

    assert await until_disconnected(_Request(leave_after=None), work()) == "done"  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_the_work_is_cancelled_and_cleaned_up_when_the_client_leaves_first():
    cleaned = asyncio.Event()

    async def work() -> str:
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.set()
        return "never"

    with pytest.raises(ClientDisconnected):
        await until_disconnected(_Request(leave_after=0.01), work())  # type: ignore[arg-type]
    assert cleaned.is_set()  # the engine iterator's cleanup ran before the answer


@pytest.mark.anyio
async def test_the_work_s_own_error_is_raised_not_hidden():
    async def work() -> str:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await until_disconnected(_Request(leave_after=None), work())  # type: ignore[arg-type]
