"""What this process remembers of the updates it handles, to answer Telegram's redeliveries without
the database: an update whose attempt is running here right now (a redelivery overlapping it waits for
it, instead of racing it to the database), and one this process committed that queued no calls (a
redelivery of it has nothing to do or send again). The database's claim stays the authority: this only
saves it work, and a process that forgot (restarted, or past KEEP_APPLIED_FOR) asks it."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

__all__ = ["KEEP_APPLIED", "KEEP_APPLIED_FOR", "Deliveries"]

# How many update ids applied without calls this process remembers, to answer their redeliveries with
# no database work (about 80 bytes each, 0.8 MB in all, measured with tracemalloc).
KEEP_APPLIED = 10_000
# ...and for how long: far less than the 25 h the database keeps them, and than the week after which
# Telegram may start numbering a bot's updates afresh.
KEEP_APPLIED_FOR = 3600.0


class Deliveries:
    def __init__(self) -> None:
        # Update id -> set when its attempt here ends; made only when a redelivery waits for it.
        self._running: dict[int, asyncio.Event | None] = {}
        self._applied: dict[int, float] = {}  # ids done here with no calls queued -> when, oldest first

    async def done_here(self, update_id: int, deadline: float) -> bool:
        """Whether the update is done here with nothing to send again, once an attempt of it running
        here has ended. Raises TimeoutError when that attempt still runs at `deadline` (loop time)."""
        if update_id in self._running:
            async with asyncio.timeout_at(deadline):
                while update_id in self._running:
                    running = self._running[update_id]
                    if running is None:
                        running = self._running[update_id] = asyncio.Event()
                    await running.wait()
        applied = self._applied.get(update_id)
        return applied is not None and time.monotonic() - applied < KEEP_APPLIED_FOR

    def running(self, update_id: int) -> _Running:
        """An attempt of the update runs here (`with` it): redeliveries wait for it (`done_here`)."""
        return _Running(self._running, update_id)

    def remember(self, update_id: int) -> None:
        """The update is done here (applied, handled by the error hook, or a dead letter), no call queued."""
        self._applied[update_id] = time.monotonic()
        if len(self._applied) > KEEP_APPLIED:
            del self._applied[next(iter(self._applied))]  # the oldest: dicts keep insertion order


class _Running:
    """`Deliveries.running`: a class, not a @contextmanager, as every update enters one."""

    __slots__ = ("_running", "_update_id")

    def __init__(self, running: dict[int, asyncio.Event | None], update_id: int) -> None:
        self._running = running
        self._update_id = update_id

    def __enter__(self) -> None:
        self._running[self._update_id] = None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        done = self._running.pop(self._update_id)
        if done is not None:
            done.set()
