"""The timers table's queries: scheduling, cancelling and claiming a timer (statements the locking
transaction sends with an update's writes), and picking due timers and recording a failed one
(`PostgresTimers`, on any pooled connection). 007_timers.sql describes the table."""

from __future__ import annotations

from .. import DueTimer
from .pool import Pooled
from .statements import unavailable_on_failure

__all__ = ["CANCEL_TIMER", "CLAIM_TIMER", "SCHEDULE_TIMER", "PostgresTimers"]

# A fire's claim: the timer is deleted when its transaction commits.
CLAIM_TIMER = "DELETE FROM timers WHERE bot_id = {} AND id = {} AND failed_at IS NULL"

# Schedules a timer, or replaces the one of the same key and name with a new id (see 007_timers.sql).
SCHEDULE_TIMER = (
    "INSERT INTO timers (bot_id, key, name, handler, payload, origin, due_at)"
    " VALUES ({bot}, {key}, {name}, {handler}, {payload}::jsonb, {origin}::jsonb,"
    " coalesce(to_timestamp({at}::float8), now() + coalesce({after}::float8, 0) * interval '1 second'))"
    " ON CONFLICT (bot_id, key, name) DO UPDATE SET id = DEFAULT, handler = EXCLUDED.handler,"
    " payload = EXCLUDED.payload, origin = EXCLUDED.origin, due_at = EXCLUDED.due_at, created_at = now(),"
    " lease_until = '-infinity', failed_at = NULL, last_error = NULL"
)
CANCEL_TIMER = "DELETE FROM timers WHERE bot_id = {bot} AND key = {key} AND name = {name}"

# How many due timers one pick looks at to find each key's earliest: every key with a timer among them
# has its earliest among them too, so no key's timers fire out of order, however few are looked at.
_TIMER_WINDOW = 1000


class PostgresTimers(Pooled):
    """Due timers, picked for firing by any process."""

    async def claim_due_timers(self, bot_id: int, limit: int, lease: float) -> list[DueTimer]:
        with unavailable_on_failure("claim due timers"):
            rows = await self._pool.fetch(
                # heads: each key's earliest due timer. A head another process leased is skipped, and so
                # are the later timers of its key: they wait for it to be fired (deleted). The lease is
                # checked again on the row locked (a pick that committed since this statement's start).
                # Keys are told apart byte by byte (COLLATE "C": a locale's sort cost ~1/3 of the
                # statement), and the free heads are looked up by id (= ANY of an array, so the plan is an
                # index scan of them, not a scan of the whole table joined to them).
                "WITH due AS (SELECT id, key, due_at, lease_until FROM timers"
                "  WHERE bot_id = $1 AND failed_at IS NULL AND due_at <= now() ORDER BY due_at, id LIMIT $4),"
                ' heads AS (SELECT DISTINCT ON (key COLLATE "C") id, lease_until FROM due'
                '  ORDER BY key COLLATE "C", due_at, id)'
                " UPDATE timers SET lease_until = now() + $3 * interval '1 second' WHERE id IN ("
                " SELECT t.id FROM timers t WHERE t.id = ANY (ARRAY(SELECT id FROM heads WHERE lease_until <= now()))"
                " AND t.lease_until <= now() AND t.failed_at IS NULL ORDER BY t.due_at, t.id LIMIT $2"
                " FOR UPDATE OF t SKIP LOCKED)"
                " RETURNING id, key, name, handler, payload::text AS payload, origin::text AS origin,"
                " extract(epoch FROM due_at)::float8 AS due_at, extract(epoch FROM now() - due_at)::float8 AS late",
                bot_id,
                limit,
                lease,
                _TIMER_WINDOW,
                timeout=self._acquire_timeout * 2,
            )
        return [DueTimer(**dict(r)) for r in sorted(rows, key=lambda r: (r["due_at"], r["id"]))]

    async def fail_timer(self, timer_id: int, error: str) -> None:
        await self._execute(
            "record a failed timer",
            "UPDATE timers SET failed_at = now(), last_error = $2 WHERE id = $1",
            timer_id,
            error,
        )
