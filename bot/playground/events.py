"""What happened in the playground, numbered, for the page and `python -m bot chat` to poll.

Polling with a short hold rather than server-sent events: an open stream would hold up the server's
graceful shutdown (uvicorn waits for open responses), while a poll answers within `hold` seconds, and
a client that was away asks from its last number and misses nothing still kept.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from typing import Any

__all__ = ["EventLog"]


class EventLog:
    def __init__(self, keep: int = 5000) -> None:
        # A new epoch per process: a client that polls across a restart starts over from 0.
        self.epoch = secrets.token_hex(4)
        self._events: deque[dict[str, Any]] = deque(maxlen=keep)
        self._seq = 0
        self._changed = asyncio.Event()

    def publish(self, kind: str, **fields: Any) -> None:
        self._seq += 1
        self._events.append({"seq": self._seq, "kind": kind, **fields})
        self._changed.set()
        self._changed = asyncio.Event()

    def since(self, after: int) -> list[dict[str, Any]]:
        return [event for event in self._events if event["seq"] > after]

    async def wait(self, after: int, hold: float) -> list[dict[str, Any]]:
        """Events numbered above `after`, waiting up to `hold` seconds for the first one."""
        if after >= self._seq:
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), hold)
            except TimeoutError:
                return []
        return self.since(after)
