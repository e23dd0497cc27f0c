"""The responses kept for `previous_response_id`, GET and DELETE: a bounded in-memory store.

Each entry keeps the response and the whole conversation that led to it, its output included, as
chat-template messages, so that a follow-up only prepends them (an ancestor's eviction does not
break a chain). Entries share the messages they have in common. The oldest entry goes first when
the store is full; the store is lost when the server stops.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from server.api.responses.protocol import ResponseObject

# Responses kept unless create_app says otherwise.
DEFAULT_STORED_RESPONSES = 1024


@dataclass(frozen=True)
class StoredResponse:
    response: ResponseObject
    conversation: list[dict[str, Any]]  # chat-template messages, without the instructions


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, entry: StoredResponse) -> None:
        self._entries[entry.response.id] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None
