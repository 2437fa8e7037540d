"""What the conformance suite's checks (bot.testing.conformance) share: the storage factory's type, a
transaction held open in a task of its own (to see another one wait for its lock), a session read or
written in a transaction of its own, and the bounds on every wait, so that a storage that deadlocks
fails a check instead of hanging it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from ..storage import Moved, Storage, StoredSession, Transaction

__all__ = [
    "BLOCKED_FOR",
    "WAIT_LIMIT",
    "Boom",
    "Check",
    "Holder",
    "StorageFactory",
    "holding",
    "read_session",
    "still_blocked",
    "stored_data",
    "write_session",
]

StorageFactory = Callable[[], Awaitable[Storage]]
Check = Callable[[StorageFactory], Awaitable[None]]

# How long a blocked call is watched to be sure it is blocked, and how long any single wait may take.
BLOCKED_FOR = 0.2
WAIT_LIMIT = 5.0


class Boom(Exception):
    """Stands for a bug in an app's own code: raised inside a transaction to roll it back."""


async def read_session(storage: Storage, key: str) -> StoredSession | Moved | None:
    async with storage.transaction() as tx:
        return await tx.read(key)


async def stored_data(storage: Storage, key: str) -> str | None:
    """The stored JSON without spaces (PostgreSQL's jsonb adds its own)."""
    stored = await read_session(storage, key)
    if isinstance(stored, Moved):
        return f"moved to {stored.key}"
    return None if stored is None else stored.data.replace(" ", "")


async def write_session(
    storage: Storage, key: str, data: str, version: int = 0, ttl: float | None = None
) -> None:
    async with storage.transaction() as tx:
        await tx.read(key)
        await tx.write(key, StoredSession(data, version), ttl)


class Holder:
    """A transaction, in its own task, that takes a lock and keeps it until `finish()`."""

    def __init__(self, storage: Storage, lock: Callable[[Transaction], Awaitable[Any]]) -> None:
        self.locked = asyncio.Event()
        self.result: Any = None
        self._go = asyncio.Event()
        self._then: Callable[[Transaction], Awaitable[None]] | None = None
        self._commit = True
        self._task = asyncio.create_task(self._run(storage, lock))

    async def _run(self, storage: Storage, lock: Callable[[Transaction], Awaitable[Any]]) -> None:
        try:
            async with storage.transaction() as tx:
                self.result = await lock(tx)
                self.locked.set()
                await self._go.wait()
                if self._then is not None:
                    await self._then(tx)
                if not self._commit:
                    raise Boom
        except Boom:
            pass

    async def finish(
        self, then: Callable[[Transaction], Awaitable[None]] | None = None, *, commit: bool = True
    ) -> None:
        """Do `then` in the holder's transaction, commit it (or roll it back), and wait until it has."""
        if not self._go.is_set():
            self._then, self._commit = then, commit
            self._go.set()
        await asyncio.wait_for(asyncio.shield(self._task), WAIT_LIMIT)


@asynccontextmanager
async def holding(storage: Storage, lock: Callable[[Transaction], Awaitable[Any]]) -> AsyncIterator[Holder]:
    holder = Holder(storage, lock)
    try:
        await asyncio.wait_for(holder.locked.wait(), WAIT_LIMIT)
        yield holder
    finally:
        # A failed check still ends the holder's transaction, so no lock or task outlives the check.
        try:
            await holder.finish(commit=False)
        finally:
            holder._task.cancel()


async def still_blocked(call: asyncio.Future[Any], promise: str) -> None:
    await asyncio.sleep(BLOCKED_FOR)
    assert not call.done(), promise
