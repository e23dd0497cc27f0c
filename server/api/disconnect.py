"""Tying a piece of request work to the client's connection: the client leaves, the work stops.

Starlette does not cancel an endpoint whose client has gone; without this, a non-streaming
request (or a stream still waiting for its first token) would run to max_tokens for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Result of `work`, or ClientDisconnected once `work` is cancelled because the client left.

    Cancelling `work` throws into the engine iterator it awaits, which ends the generation.
    """
    work_task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({work_task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work_task.cancel()
        raise
    finally:
        gone.cancel()
    if work_task in done:
        return work_task.result()
    work_task.cancel()
    await asyncio.wait({work_task})  # let the engine iterator's cleanup run before answering
    raise ClientDisconnected


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
