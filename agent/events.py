"""A live feed of what the agent does, for ``agentctl events --follow``.

Services publish small dicts (``kind`` plus fields); every subscriber gets its own bounded
buffer. A subscriber that stops reading loses events (counted in ``dropped``) rather than
slowing the agent down: the feed is for watching, never on a request's critical path.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream


class EventBus:
    def __init__(self, *, history: int = 200, buffer: int = 1000) -> None:
        self._subscribers: set[MemoryObjectSendStream[dict[str, Any]]] = set()
        self._history: deque[dict[str, Any]] = deque(maxlen=history)
        self._buffer = buffer
        self.published = 0
        self.dropped = 0

    def __repr__(self) -> str:
        return (
            f"<EventBus subscribers={len(self._subscribers)} published={self.published} "
            f"dropped={self.dropped}>"
        )

    def publish(self, kind: str, **fields: Any) -> None:
        """Record an event and hand it to every subscriber without waiting."""
        event = {"ts": round(time.time(), 3), "kind": kind, **fields}
        self.published += 1
        self._history.append(event)
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except anyio.WouldBlock:
                self.dropped += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(send)

    def recent(self) -> list[dict[str, Any]]:
        return list(self._history)

    @asynccontextmanager
    async def subscribe(
        self, *, replay: bool = False
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Yield an iterator of events published from now on (after recent ones if ``replay``)."""
        send, recv = anyio.create_memory_object_stream[dict[str, Any]](self._buffer)
        if replay:
            for event in self._history:
                send.send_nowait(event)
        self._subscribers.add(send)
        try:
            async with recv:
                yield recv
        finally:
            self._subscribers.discard(send)
            send.close()
