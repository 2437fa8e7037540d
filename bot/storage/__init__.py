"""What a session storage must do, whatever keeps the data.

A storage hands out one transaction per update. Inside it, `read` locks the key until the transaction
ends, so two updates of one chat (in one process or in several) take turns instead of overwriting each
other's increments. The same transaction records the update as processed (`claim_update`) and queues the
update's outgoing calls (`enqueue`), so the session write, the exactly-once record and the replies commit
or vanish together.

`docs/SESSIONS.md` describes the contract in prose; `bot.testing.conformance` checks an adapter against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Moved",
    "OutgoingCall",
    "PendingCall",
    "Storage",
    "StorageUnavailable",
    "StoredSession",
    "Transaction",
]


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A session as the storage keeps it: JSON text plus the version of the shape it was written in."""

    data: str
    version: int = 0


@dataclass(frozen=True, slots=True)
class Moved:
    """What `read` finds at a key whose session moved (a group upgraded to a supergroup): where it went."""

    key: str


@dataclass(frozen=True, slots=True)
class OutgoingCall:
    """A Bot API call a handler asked for; sent only after the update's transaction commits."""

    method: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PendingCall:
    """An outbox row this process holds the lease on and should send now."""

    id: int
    method: str
    params: dict[str, Any]


class StorageUnavailable(Exception):
    """The database could not do its part (unreachable, lock or statement timeout, pool exhausted...).

    The update was not applied; the webhook answers 503 so that Telegram delivers it again.
    """


class Transaction(Protocol):
    async def claim_update(self, bot_id: int, update_id: int) -> bool:
        """Record the update as processed; False if it already was (a redelivery).

        A concurrent attempt at the same update waits here until the first one commits or rolls back.
        """

    async def read(self, key: str) -> StoredSession | Moved | None:
        """Lock `key` for the rest of the transaction, even a key that has no session yet (the first two
        updates of a new chat must take turns too), and return its session (None: missing or expired),
        or where it moved to (see `move`)."""

    async def write(self, key: str, session: StoredSession, ttl: float | None = None) -> None:
        """Store the session, to read as missing `ttl` seconds from now when ttl is set."""

    async def delete(self, key: str) -> None: ...

    async def move(self, key: str, to: str, keep: float) -> None:
        """Replace the session at `key` with a forward to `to`: for `keep` seconds `read(key)` returns
        `Moved(to)`, then the key reads as missing. A later `write` or `delete` replaces the forward."""

    async def enqueue(
        self, bot_id: int, update_id: int, calls: Sequence[OutgoingCall], lease: float
    ) -> list[PendingCall]:
        """Queue calls for sending after commit, leased to the caller for `lease` seconds."""

    async def claim_unsent(self, bot_id: int, update_id: int, lease: float) -> list[PendingCall]:
        """Take over this update's calls that nobody confirmed and whose lease has run out."""


class Storage(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """A unit of work: committed when the block exits normally, rolled back when it raises.

        No database work happens until the first method call, so updates that touch no session cost
        nothing.
        """

    async def mark_sent(self, call_id: int) -> None: ...

    async def mark_failed(self, call_id: int, error: str, *, retry_in: float | None) -> None:
        """Record a failed send: retried after `retry_in` seconds, or never when retry_in is None."""

    async def claim_due(self, limit: int, lease: float) -> list[PendingCall]:
        """Lease unsent calls whose lease ran out (their sender crashed or failed), oldest first."""

    async def prune(self, keep_updates: float, keep_sent: float) -> int:
        """Forget processed update ids and sent (or abandoned) calls older than the given ages in seconds,
        and delete expired sessions, without waiting on rows locked at the moment. Returns how many rows
        it removed."""

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the storage answers and is ready to serve."""

    async def close(self) -> None: ...
