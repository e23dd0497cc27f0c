"""The one parser of server-sent events for tests: the `data:` payloads of a stream.

Every payload is JSON except the final "[DONE]", which is kept as that string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

DONE = "[DONE]"
_PREFIX = "data:"


def iter_sse(lines: Iterable[str]) -> Iterator[Any]:
    """Payloads of `data:` lines as they arrive (e.g. from `httpx.Response.iter_lines()`);
    other lines (comments, `event:`, blank separators) are skipped."""
    for line in lines:
        if not line.startswith(_PREFIX):
            continue
        payload = line[len(_PREFIX) :].removeprefix(" ")
        yield payload if payload == DONE else json.loads(payload)


def sse_events(body: str | httpx.Response | Iterable[str]) -> list[Any]:
    """All payloads of a complete SSE body: a response, its text, or its lines."""
    if isinstance(body, httpx.Response):
        body = body.text
    if isinstance(body, str):
        body = body.splitlines()
    return list(iter_sse(body))


def finish_reason(event: Any) -> str | None:
    """The finish_reason a chunk carries (None for [DONE], error events and usage chunks)."""
    if not isinstance(event, dict):
        return None
    choices = event.get("choices") or [{}]
    reason: str | None = choices[0].get("finish_reason")
    return reason


def content(events: Iterable[Any]) -> str:
    """The streamed text: every chunk's delta content, in order."""
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict) and e.get("choices")
    )
