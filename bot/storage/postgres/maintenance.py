"""Keeping the tables small and listing what failed: the hourly prune (old update ids, settled calls,
idle send budgets, expired sessions) and the dead letters (`python -m bot dead-letters`), on any pooled
connection (`PostgresMaintenance`); and a dead letter's row as both it and the locking transaction's
replay read it."""

from __future__ import annotations

import asyncpg

from .. import DeadLetter
from .pool import Pooled

__all__ = ["DEAD_LETTER_COLUMNS", "PostgresMaintenance", "dead_letter_of"]

DEAD_LETTER_COLUMNS = "update_id, chat, kind, body, error, traceback, attempts, extract(epoch FROM failed_at)::float8 AS failed_at"


def dead_letter_of(row: asyncpg.Record) -> DeadLetter:
    return DeadLetter(**dict(row))


class PostgresMaintenance(Pooled):
    async def prune(self, keep_updates: float, keep_sent: float) -> int:
        total = 0
        for what, query, age in (
            (
                "prune processed updates",
                "DELETE FROM processed_updates WHERE processed_at < now() - $1 * interval '1 second'",
                keep_updates,
            ),
            (
                "prune sent replies",
                "DELETE FROM outbox WHERE coalesce(sent_at, failed_at) < now() - $1 * interval '1 second'",
                keep_sent,
            ),
            (
                "prune idle send budgets",
                "DELETE FROM send_budget WHERE key <> '*'"
                " AND greatest(next_at, paused_until) < extract(epoch FROM now()) - $1",
                3600.0,
            ),
            (
                # SKIP LOCKED: a session being read right now is left for the next round, not waited on.
                "prune expired sessions",
                "DELETE FROM sessions WHERE key IN (SELECT key FROM sessions WHERE expires_at <= now()"
                " - $1 * interval '1 second' FOR UPDATE SKIP LOCKED)",
                0.0,
            ),
        ):
            status = await self._execute(what, query, age)
            total += int(status.rsplit(" ", 1)[-1])
        return total

    async def dead_letters(self, bot_id: int) -> list[DeadLetter]:
        rows = await self._fetch(
            "list dead letters",
            f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE bot_id = $1 ORDER BY failed_at, update_id",
            bot_id,
        )
        return [dead_letter_of(row) for row in rows]
