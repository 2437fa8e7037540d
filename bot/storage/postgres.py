"""PostgreSQL storage on an asyncpg pool: where the bot's correctness lives.

One update is one transaction on one pooled connection:

    BEGIN; SET LOCAL lock_timeout ...        -- one message: the timeouts live in the transaction
      INSERT processed_updates ...           -- claim: a redelivery waits here for its first attempt
      SELECT ... FROM sessions FOR UPDATE    -- lock the session row (created first if missing)
      ... handlers run ...
      INSERT ... ON CONFLICT DO UPDATE       -- write the session back
      INSERT INTO outbox ...                 -- the replies, leased to this process
    COMMIT                                   -- then the replies are sent, with no lock held

Lock order inside a transaction is: the update id's unique index entry, then session rows in the order
the session layer reads them (sorted, when it needs several). The only waits are on those, bounded by
`lock_timeout`; every failure of the database or the connection becomes StorageUnavailable (503, and
Telegram delivers the update again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ..metrics import Metrics
from ..migrate import NotMigrated, check_migrated
from ..pooler import connect_options
from . import (
    Budget,
    Moved,
    OutboxStatus,
    OutgoingCall,
    PendingCall,
    Reservation,
    StorageUnavailable,
    StoredSession,
)

__all__ = ["PostgresStorage", "SessionRow"]


@contextmanager
def _unavailable_on_failure(what: str) -> Iterator[None]:
    """Whatever the driver raises here (a lost connection, a timeout, a terminated backend, a protocol
    state error after one, a missing table), the update was not stored. Reporting it as
    StorageUnavailable makes the webhook answer 503 and Telegram deliver the update again; treating it
    as a handler bug would acknowledge an update we never kept."""
    try:
        yield
    except StorageUnavailable:
        raise
    except Exception as exc:
        raise StorageUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc


# What every query handing calls to a sender returns, for _pending().
_CALL = "id, method, payload::text AS payload, attempts, extract(epoch FROM created_at)::float8 AS created_at"


def _pending(rows: Sequence[asyncpg.Record]) -> list[PendingCall]:
    return [
        PendingCall(r["id"], r["method"], json.loads(r["payload"]), r["created_at"], r["attempts"])
        for r in sorted(rows, key=lambda r: r["id"])
    ]


class _PostgresTransaction:
    """Begins on first use: an update that touches no session never takes a connection."""

    def __init__(
        self, pool: asyncpg.Pool, acquire_timeout: float, metrics: Metrics | None, begin: str
    ) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        self._metrics = metrics
        self._begin = begin
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None
        # Rows this transaction inserted only to have something to lock; removed before commit unless
        # written, so "no session" stays "no row".
        self._placeholders: set[str] = set()

    async def _connection(self) -> asyncpg.pool.PoolConnectionProxy:
        if self._conn is None:
            started = time.perf_counter()
            with _unavailable_on_failure("acquire a connection"):
                conn = await self._pool.acquire(timeout=self._acquire_timeout)
            if self._metrics is not None:
                self._metrics.pool_wait.observe(time.perf_counter() - started)
            self._conn = conn
            with _unavailable_on_failure("begin"):
                await conn.execute(self._begin)
        return self._conn

    async def claim_update(self, bot_id: int, update_id: int) -> bool:
        conn = await self._connection()
        with _unavailable_on_failure("claim update"):
            claimed = await conn.fetchval(
                "INSERT INTO processed_updates (bot_id, update_id) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING true",
                bot_id,
                update_id,
            )
        return bool(claimed)

    async def read(self, key: str) -> StoredSession | Moved | None:
        conn = await self._connection()
        with _unavailable_on_failure(f"read session {key!r}"):
            # A missing row cannot be locked, so the first two updates of a new chat would both see
            # "nothing" and both insert. Inserting a placeholder gives them a row to queue on: the loser
            # of the INSERT race waits for the winner's commit, then reads and locks the winner's row.
            # The loop repeats when the row vanished between our INSERT and SELECT (deleted and
            # committed by another transaction); it ends because each pass either locks a row or
            # inserts one.
            while True:
                # moved_to rides along: a chat that moved costs no extra query to find out (002).
                started = time.perf_counter()
                row = await conn.fetchrow(
                    "SELECT data::text AS data, version, expires_at <= now() AS expired, moved_to"
                    " FROM sessions WHERE key = $1 FOR UPDATE",
                    key,
                )
                if self._metrics is not None:
                    self._metrics.lock_wait.observe(time.perf_counter() - started)
                if row is not None:
                    if row["expired"]:
                        return None
                    if row["moved_to"] is not None:
                        return Moved(row["moved_to"])
                    if row["data"] is None:
                        return None
                    return StoredSession(row["data"], row["version"])
                inserted = await conn.fetchval(
                    "INSERT INTO sessions (key) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true", key
                )
                if inserted:
                    self._placeholders.add(key)
                    return None

    async def write(self, key: str, session: StoredSession, ttl: float | None = None) -> None:
        conn = await self._connection()
        with _unavailable_on_failure(f"write session {key!r}"):
            await conn.execute(
                "INSERT INTO sessions (key, data, version, expires_at, updated_at)"
                " VALUES ($1, $2::jsonb, $3, now() + $4 * interval '1 second', now())"
                " ON CONFLICT (key) DO UPDATE SET data = EXCLUDED.data, version = EXCLUDED.version,"
                " expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at, moved_to = NULL",
                key,
                session.data,
                session.version,
                ttl,
            )
        self._placeholders.discard(key)

    async def delete(self, key: str) -> None:
        conn = await self._connection()
        with _unavailable_on_failure(f"delete session {key!r}"):
            await conn.execute("DELETE FROM sessions WHERE key = $1", key)
        self._placeholders.discard(key)

    async def move(self, key: str, to: str, keep: float) -> None:
        conn = await self._connection()
        with _unavailable_on_failure(f"move session {key!r}"):
            # A forward is a data-less row that expires: the prune of expired sessions removes it.
            await conn.execute(
                "INSERT INTO sessions (key, moved_to, expires_at) VALUES ($1, $2, now() + $3 * interval '1 second')"
                " ON CONFLICT (key) DO UPDATE SET data = NULL, version = 0, moved_to = EXCLUDED.moved_to,"
                " expires_at = EXCLUDED.expires_at, updated_at = now()",
                key,
                to,
                keep,
            )
        self._placeholders.discard(key)

    async def enqueue(
        self, bot_id: int, update_id: int, calls: Sequence[OutgoingCall], lease: float
    ) -> list[PendingCall]:
        if not calls:
            return []
        conn = await self._connection()
        with _unavailable_on_failure("queue replies"):
            rows = await conn.fetch(
                "INSERT INTO outbox (bot_id, update_id, method, payload, lease_until)"
                " SELECT $1, $2, c.method, c.payload::jsonb, now() + $5 * interval '1 second'"
                " FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS c(method, payload, n)"
                f" ORDER BY c.n RETURNING {_CALL}",
                bot_id,
                update_id,
                [c.method for c in calls],
                [json.dumps(c.params) for c in calls],
                lease,
            )
        return _pending(rows)

    async def claim_unsent(self, bot_id: int, update_id: int, lease: float) -> list[PendingCall]:
        conn = await self._connection()
        with _unavailable_on_failure("claim unsent replies"):
            rows = await conn.fetch(
                "UPDATE outbox SET lease_until = now() + $3 * interval '1 second'"
                " WHERE bot_id = $1 AND update_id = $2 AND sent_at IS NULL AND failed_at IS NULL"
                f" AND lease_until <= now() RETURNING {_CALL}",
                bot_id,
                update_id,
                lease,
            )
        return _pending(rows)

    async def finish(self, commit: bool) -> None:
        """Commit or roll back, and always give the connection back to the pool."""
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            if commit:
                with _unavailable_on_failure("commit"):
                    if self._placeholders:
                        await conn.execute(
                            "DELETE FROM sessions WHERE key = ANY($1::text[]) AND data IS NULL",
                            list(self._placeholders),
                        )
                    await conn.execute("COMMIT")
            else:
                await conn.execute("ROLLBACK")
        finally:
            # A connection broken mid-transaction fails its reset on release and is terminated by the
            # pool, not reused; that failure says nothing about this transaction's outcome.
            with contextlib.suppress(Exception):
                await self._pool.release(conn)


@dataclass(frozen=True, slots=True)
class SessionRow:
    """A stored session with its bookkeeping, as `PostgresStorage.peek` shows it."""

    key: str
    data: str
    version: int
    updated_at: datetime
    expires_at: datetime | None


class PostgresStorage:
    """Sessions, processed update ids and the outbox in PostgreSQL. The pool is owned by this object."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        acquire_timeout: float = 5.0,
        lock_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        self._metrics = metrics  # for the lock-wait and pool-wait histograms
        # Timeouts as SET LOCAL inside each transaction, sent in the same simple-query message as BEGIN:
        # no extra round trip, and nothing that depends on the session, which a transaction-mode pooler
        # does not keep (and whose startup parameters it refuses: "unsupported startup parameter").
        self._begin = (
            f"BEGIN; SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms';"
            f" SET LOCAL statement_timeout = '{int(statement_timeout * 1000)}ms';"
            f" SET LOCAL idle_in_transaction_session_timeout = '{int(statement_timeout * 3000)}ms'"
        )

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        acquire_timeout: float = 5.0,
        lock_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        application_name: str = "bot",
        metrics: Metrics | None = None,
        pooler: str = "auto",
    ) -> PostgresStorage:
        """Open a pool. Connections are made lazily after the first, so a database that is down at
        start-up is reported here, and one that goes away later is reconnected by the pool.

        `pooler` is DB_POOLER: behind a transaction-mode pooler no statement is cached on the server."""
        with _unavailable_on_failure("connect to the database"):
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                # Stale connections (a database restart, a failover) are replaced, not handed out.
                max_inactive_connection_lifetime=60.0,
                # application_name (naming the bot in pg_stat_activity) is one of the few startup
                # parameters PgBouncer passes on; the timeouts are set inside each transaction instead.
                server_settings={"application_name": application_name},
                **connect_options(dsn, pooler),
            )
        return cls(
            pool,
            acquire_timeout=acquire_timeout,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
            metrics=metrics,
        )

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PostgresTransaction]:
        tx = _PostgresTransaction(self._pool, self._acquire_timeout, self._metrics, self._begin)
        try:
            yield tx
        except BaseException:
            # Rolling back on a broken connection fails too; the original error is the one to report,
            # and release() in finish() still returns (or discards) the connection.
            with contextlib.suppress(Exception):
                await tx.finish(commit=False)
            raise
        await tx.finish(commit=True)

    async def _execute(self, what: str, query: str, *args: Any) -> str:
        with _unavailable_on_failure(what):
            return await self._pool.execute(query, *args, timeout=self._acquire_timeout * 2)

    async def mark_sent(self, call_id: int) -> None:
        await self._execute(
            "mark reply sent",
            "UPDATE outbox SET sent_at = now(), attempts = attempts + 1, last_error = NULL WHERE id = $1",
            call_id,
        )

    async def mark_failed(
        self, call_id: int, error: str, *, retry_in: float | None, now: float | None = None
    ) -> None:
        await self._execute(
            "mark reply failed",
            "UPDATE outbox SET attempts = attempts + 1, last_error = $2,"
            " failed_at = CASE WHEN $3::float8 IS NULL THEN now() END,"
            " lease_until = to_timestamp(coalesce($4::float8, extract(epoch FROM now()))"
            " + coalesce($3::float8, 0)) WHERE id = $1",
            call_id,
            error,
            retry_in,
            now,
        )

    async def defer(self, call_ids: Sequence[int], until: float) -> None:
        await self._execute(
            "defer replies",
            "UPDATE outbox SET lease_until = to_timestamp($2) WHERE id = ANY($1::bigint[])",
            list(call_ids),
            until,
        )

    async def claim_due(self, limit: int, lease: float, now: float | None = None) -> list[PendingCall]:
        with _unavailable_on_failure("claim due replies"):
            rows = await self._pool.fetch(
                # heads: each chat's first unsent call, in one pass over the pending index (a
                # NOT EXISTS per row was quadratic when the planner misjudged a fresh backlog).
                "WITH t AS (SELECT to_timestamp(coalesce($3::float8, extract(epoch FROM now()))) AS now),"
                " heads AS (SELECT DISTINCT ON (chat_key) id FROM outbox"
                "  WHERE sent_at IS NULL AND failed_at IS NULL ORDER BY chat_key, id)"
                " UPDATE outbox SET lease_until = t.now + $2 * interval '1 second' FROM t WHERE id IN ("
                " SELECT o.id FROM outbox o, t WHERE o.sent_at IS NULL AND o.failed_at IS NULL"
                " AND o.lease_until <= t.now AND (o.chat_key IS NULL OR o.id IN (SELECT id FROM heads))"
                " ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED)"
                f" RETURNING {_CALL}",
                limit,
                lease,
                now,
            )
        return _pending(rows)

    async def reserve_send(
        self, call: PendingCall, budgets: Sequence[Budget], now: float
    ) -> Reservation | None:
        with _unavailable_on_failure("reserve a send"):
            row = await self._pool.fetchrow(
                "SELECT * FROM reserve_send($1, $2, $3::text[], $4::float8[], $5::float8[], $6)",
                call.id,
                call.chat,
                [b.key for b in budgets],
                [b.interval for b in budgets],
                [float(b.burst) for b in budgets],
                now,
                timeout=self._acquire_timeout * 2,
            )
        assert row is not None
        return None if row["wait"] is None else Reservation(row["wait"], row["blocked_by"])

    async def pause_sends(self, chat: str | None, until: float, now: float) -> bool:
        with _unavailable_on_failure("pause sends"):
            everything: bool = await self._pool.fetchval(
                "SELECT pause_sends($1, $2, $3)", chat, until, now, timeout=self._acquire_timeout * 2
            )
        return everything

    async def outbox_status(self, now: float) -> OutboxStatus:
        with _unavailable_on_failure("read the outbox status"):
            row = await self._pool.fetchrow(
                "SELECT (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND failed_at IS NULL) AS unsent,"
                " (SELECT extract(epoch FROM min(created_at))::float8 FROM outbox"
                "  WHERE sent_at IS NULL AND failed_at IS NULL) AS oldest,"
                " (SELECT max(paused_until) FROM send_budget WHERE key = '*') AS paused_until,"
                " (SELECT count(*) FROM send_budget WHERE key <> '*' AND paused_until > $1) AS paused_chats",
                now,
                timeout=self._acquire_timeout * 2,
            )
        assert row is not None
        return OutboxStatus(
            unsent=row["unsent"],
            oldest_age=max(0.0, now - row["oldest"]) if row["oldest"] is not None else 0.0,
            paused_for=max(0.0, (row["paused_until"] or 0.0) - now),
            paused_chats=row["paused_chats"],
        )

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

    async def ping(self) -> None:
        with _unavailable_on_failure("ping"):
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                try:
                    await check_migrated(conn)
                except NotMigrated as exc:
                    raise StorageUnavailable(str(exc)) from exc

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout=10)
        except TimeoutError:
            self._pool.terminate()

    # --- read-only looks for the playground: no locks taken, none waited for ---

    async def peek(self, key: str) -> SessionRow | None:
        """The committed row for display (the playground), read without a lock: never waits on, or
        holds up, an update. Lock placeholders (data IS NULL) are nobody's session."""
        with _unavailable_on_failure(f"peek at session {key!r}"):
            row = await self._pool.fetchrow(
                "SELECT key, data::text AS data, version, updated_at, expires_at FROM sessions"
                " WHERE key = $1 AND data IS NOT NULL",
                key,
                timeout=self._acquire_timeout * 2,
            )
        return None if row is None else SessionRow(**dict(row))

    async def latest_update_id(self, bot_id: int) -> int | None:
        """The highest update id recorded for the bot: the playground numbers its own updates above it."""
        with _unavailable_on_failure("read the latest update id"):
            latest: int | None = await self._pool.fetchval(
                "SELECT max(update_id) FROM processed_updates WHERE bot_id = $1",
                bot_id,
                timeout=self._acquire_timeout * 2,
            )
        return latest

    async def queued_calls(self, bot_id: int, update_id: int) -> int:
        """How many Bot API calls the update queued: the replies `python -m bot chat` waits for."""
        with _unavailable_on_failure("count queued calls"):
            count: int = await self._pool.fetchval(
                "SELECT count(*) FROM outbox WHERE bot_id = $1 AND update_id = $2",
                bot_id,
                update_id,
                timeout=self._acquire_timeout * 2,
            )
        return count
