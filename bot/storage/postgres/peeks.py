"""Read-only looks for the playground and `python -m bot chat`: a session as stored, the latest update
id, how many calls an update queued (`PostgresPeeks`). No locks taken, none waited for."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .pool import Pooled

__all__ = ["PostgresPeeks", "SessionRow"]


@dataclass(frozen=True, slots=True)
class SessionRow:
    """A stored session with its bookkeeping, as `PostgresStorage.peek` shows it."""

    key: str
    data: str
    version: int
    updated_at: datetime
    expires_at: datetime | None


class PostgresPeeks(Pooled):
    async def peek(self, key: str) -> SessionRow | None:
        """The committed row for display (the playground), read without a lock: never waits on, or
        holds up, an update. Lock placeholders (data IS NULL) are nobody's session."""
        row = await self._fetchrow(
            f"peek at session {key!r}",
            "SELECT key, data::text AS data, version, updated_at, expires_at FROM sessions"
            " WHERE key = $1 AND data IS NOT NULL",
            key,
        )
        return None if row is None else SessionRow(**dict(row))

    async def latest_update_id(self, bot_id: int) -> int | None:
        """The highest update id recorded for the bot: the playground numbers its own updates above it."""
        latest: int | None = await self._fetchval(
            "read the latest update id",
            "SELECT max(update_id) FROM processed_updates WHERE bot_id = $1",
            bot_id,
        )
        return latest

    async def queued_calls(self, bot_id: int, update_id: int) -> int:
        """How many Bot API calls the update queued: the replies `python -m bot chat` waits for."""
        count: int = await self._fetchval(
            "count queued calls",
            "SELECT count(*) FROM outbox WHERE bot_id = $1 AND update_id = $2",
            bot_id,
            update_id,
        )
        return count
