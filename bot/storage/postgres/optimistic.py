"""The optimistic transaction: no lock held while the handlers run. It takes two round trips: read,
then one statement that applies the claim, the write and the replies only if the row is still the
version read (its `xmin`, with the server's start time: `_revision`), else Conflict and the pipeline runs
the update again in a locking transaction. It takes one round trip when this process remembers the row
(`bot.storage.cache`: the session and its version as this process last read or wrote it): the read is
skipped, and the same statement checks the version. It keeps no state on the connection between
transactions, so it works the same through PgBouncer in transaction mode.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from ...metrics import Metrics
from .. import Conflict, DeadLetter, OutgoingCall, PendingCall, StaleRead, StoredSession, TimerChange
from ..cache import Cached, Contended, SessionCache, Turns
from .outbox import pending_calls, queue_calls
from .statements import Args, acquire, session_columns, unavailable_on_failure

__all__ = ["OptimisticTransaction"]


def _revision(table: str = "") -> str:
    """A row version as the optimistic transaction reads, remembers and checks it: the server's start
    time and the row's `xmin`.

    An xmin names one version of a row only while the server's history goes forward. After a restore,
    or a failover to a replica that lagged, transaction ids are handed out again from an earlier point:
    a remembered xmin can come back on another version of the row (the issue's 6 where the history says
    5). Each of those starts a server (or moves to another), so no revision from before one matches any
    after it. Computed in the statements themselves: no round trip, and it holds behind a pooler too,
    where a new server session is no new connection of ours, so that no connection hook would see it."""
    return f"extract(epoch FROM pg_postmaster_start_time())::text || ':' || {table}xmin::text"


_NOT_READ: Any = object()


class OptimisticTransaction:
    """Two round trips and no lock held while the handlers run (see the module's docstring); one when
    this process remembers the session (`SessionCache`) and nobody else wrote it since.

    Handles one session key per update, the common shape; anything else (a second key, a redelivery)
    raises Conflict before writing anything, and the locking transaction takes over. Updates of one key
    take turns in this process (`Turns`), from the read to the end of the statement, so only another
    process can change a row under an attempt.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        acquire_timeout: float,
        metrics: Metrics | None,
        cache: SessionCache,
        turns: Turns,
        contended: Contended,
    ) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        self._metrics = metrics
        self._cache = cache  # what this process remembers of sessions, shared by its transactions
        self._turns = turns
        self._contended = contended
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None
        self._claim: tuple[int, int] | None = None
        self._key: str | None = None
        self._turn: str | None = None  # the key whose turn this transaction holds
        self._revision: str | None = _NOT_READ  # the row's version when read (`_revision`); None: no row
        self._cached: Cached | None = None  # what read() answered from the SessionCache
        self._write: tuple[StoredSession, float | None] | None = _NOT_READ  # None: delete
        self._done = False  # the statement was sent (or refused): nothing more goes to the database
        self._refusal: Conflict | None = None

    def _give_up(self, why: str, conflict: type[Conflict] = Conflict) -> Conflict:
        # Nothing of it is applied, and every later step raises it again: a handler (or an error hook)
        # that swallowed it must not get the update claimed without its effects.
        self._done = True
        self._refusal = conflict(why)
        return self._refusal

    async def _connection(self) -> asyncpg.pool.PoolConnectionProxy:
        if self._conn is None:
            started = time.perf_counter()
            with unavailable_on_failure("acquire a connection"):
                self._conn = await acquire(self._pool, self._acquire_timeout)
            if self._metrics is not None:
                self._metrics.pool_wait.observe(time.perf_counter() - started)
        return self._conn

    async def claim_update(self, bot_id: int, update_id: int) -> bool:
        self._claim = (bot_id, update_id)  # applied at the end, and only with the writes
        return True

    async def read(self, key: str) -> StoredSession | None:
        if self._key is not None and key != self._key:
            raise self._give_up("several sessions in one update: run it with locks")
        if key in self._contended:
            raise self._give_up(f"session {key!r} is contended: run it with locks")
        if self._turn != key:  # (a key read twice in one transaction: one turn for both reads)
            await self._turns.take(key)
            self._turn = key
        cached = self._cache.get(key)
        if cached is not None:
            # No round trip: the statement at the end checks the version, as it would after a read. A
            # redelivery is not told apart here but by its claim there (a conflict, then the lock).
            self._key, self._revision, self._cached = key, cached.revision, cached
            return cached.session
        conn = await self._connection()
        arg = Args()
        done = "false"
        if self._claim is not None:
            done = f"EXISTS (SELECT FROM processed_updates WHERE bot_id = {arg(self._claim[0])} AND update_id = {arg(self._claim[1])})"
        with unavailable_on_failure(f"read session {key!r}"):
            row = await conn.fetchrow(
                f"SELECT {done} AS done, {_revision('s.')} AS revision, s.moved_to, s.expires_at IS NULL AS lasting,"
                f" {session_columns('s.')}"
                f" FROM (VALUES (1)) AS one LEFT JOIN sessions AS s ON s.key = {arg(key)}",
                *arg.values,
            )
        assert row is not None  # the outer join returns one row
        if row["done"]:
            raise self._give_up("a redelivered update: the locking transaction tells it apart")
        if row["moved_to"] is not None and not row["expired"]:
            raise self._give_up(f"session {key!r} moved: following it takes the locking transaction")
        self._key, self._revision = key, row["revision"]
        if row["data"] is None or row["expired"]:
            return None
        session = StoredSession(row["data"], row["version"])
        if row["lasting"]:
            self._cache.put(key, session, row["revision"])
        return session

    async def write(self, key: str, session: StoredSession, ttl: float | None = None) -> None:
        self._expect_read(key)
        self._write = (session, ttl)

    async def delete(self, key: str) -> None:
        self._expect_read(key)
        self._write = None

    async def move(self, key: str, to: str, keep: float) -> None:
        raise self._give_up(f"moving session {key!r}: run it with locks")

    def _expect_read(self, key: str) -> None:
        if key != self._key:
            raise self._give_up(f"session {key!r} written without being read: run it with locks")

    async def enqueue(
        self, bot_id: int, update_id: int, calls: Sequence[OutgoingCall], lease: float
    ) -> list[PendingCall]:
        return await self._apply(calls, bot_id, update_id, lease)

    async def claim_unsent(self, bot_id: int, update_id: int, lease: float) -> list[PendingCall]:
        raise self._give_up("replies of a redelivered update: run it with locks")

    async def dead_letter(self, bot_id: int, letter: DeadLetter) -> None:
        raise self._give_up("a dead letter: record it with locks")

    async def take_dead_letter(self, bot_id: int, update_id: int) -> DeadLetter | None:
        raise self._give_up("a replay: run it with locks")

    async def schedule(self, bot_id: int, changes: Sequence[TimerChange]) -> None:
        raise self._give_up("an update that schedules timers: run it with locks")

    async def claim_timer(self, bot_id: int, timer_id: int) -> bool:
        raise self._give_up("a timer's fire: run it with locks")

    async def _apply(
        self, calls: Sequence[OutgoingCall], bot_id: int = 0, update_id: int = 0, lease: float = 0.0
    ) -> list[PendingCall]:
        """The one statement that applies everything, each part only if the one before it did: the
        claim (if the row is still the version read), the write, then the replies. A session that came
        from the cache is checked even when not written (its value was used), and the row as it is now
        comes back with a refusal, to refresh the cache.

        The claim comes first, as in the locking transaction: both take the update id's index entry
        before the session row, so a redelivery running with locks in another process cannot hold one
        while waiting for the other (the reverse order deadlocked there: 1 s stalls and a 503, measured
        on workload C with two processes)."""
        if self._refusal is not None:
            raise self._refusal
        arg, ctes, gate = Args(), [], None
        writes = self._write is not _NOT_READ and not (self._write is None and self._revision is None)
        key = arg(self._key) if writes or self._cached is not None else None
        unchanged = None  # the row is still the version read, in the statement's snapshot
        if key is not None:
            unchanged = (
                f"NOT EXISTS (SELECT FROM sessions WHERE key = {key})"
                if self._revision is None
                else f"EXISTS (SELECT FROM sessions WHERE key = {key} AND {_revision()} = {arg(self._revision)})"
            )
        if self._claim is not None:
            where = f" WHERE {unchanged}" if unchanged else ""
            ctes.append(
                f"c AS (INSERT INTO processed_updates (bot_id, update_id) SELECT {arg(self._claim[0])},"
                f" {arg(self._claim[1])}{where} RETURNING 1)"
            )
            gate = "c"
        elif unchanged is not None:
            ctes.append(f"c AS (SELECT WHERE {unchanged})")
            gate = "c"
        if writes:
            assert key is not None and gate is not None
            after = f"EXISTS (SELECT FROM {gate})"
            if self._write is None:
                sql = f"DELETE FROM sessions WHERE key = {key} AND {_revision()} = {arg(self._revision)} AND {after}"
            elif self._revision is None:
                session, ttl = self._write
                sql = (
                    "INSERT INTO sessions (key, data, version, expires_at, updated_at)"
                    f" SELECT {key}, {arg(session.data)}::jsonb, {arg(session.version)},"
                    f" now() + {arg(ttl)}::float8 * interval '1 second', now() WHERE {after}"
                    " ON CONFLICT DO NOTHING"
                )
            else:
                session, ttl = self._write
                sql = (
                    f"UPDATE sessions SET data = {arg(session.data)}::jsonb, version = {arg(session.version)},"
                    f" expires_at = now() + {arg(ttl)}::float8 * interval '1 second', updated_at = now(),"
                    f" moved_to = NULL WHERE key = {key} AND {_revision()} = {arg(self._revision)} AND {after}"
                )
            ctes.append(f"w AS ({sql} RETURNING {_revision()} AS revision)")
            gate = "w"
        if calls:
            where = f" WHERE EXISTS (SELECT FROM {gate})" if gate else ""
            ctes.append(f"o AS ({queue_calls(arg, bot_id, update_id, lease, calls, where)})")
        self._done = True
        if not ctes:
            return []
        applied = f"EXISTS (SELECT FROM {gate})" if gate else "true"
        query = f"WITH {', '.join(ctes)} SELECT {applied} AS applied"
        joins = " FROM (VALUES (1)) AS one"
        if writes:
            query += ", (SELECT revision FROM w) AS revision"
            if self._claim is not None:
                # Claimed, but the row changed between the statement's snapshot and the write (another
                # process committed in between): a division by zero rolls the whole statement back, so
                # the claim does not stay without its write. (A count, not a constant 1/0, which the
                # planner would fold and raise every time.)
                query += (
                    ", CASE WHEN EXISTS (SELECT FROM c) THEN 1 / (SELECT count(*)::int FROM w) END AS torn"
                )
        if self._cached is not None:
            # Read in the statement's snapshot, before its own write: the row that failed the version
            # check.
            query += ", cur.revision AS cur_revision, cur.data AS cur_data, cur.version AS cur_version"
            joins += (
                f" LEFT JOIN (SELECT {_revision()} AS revision, data::text AS data, version FROM sessions"
                f" WHERE key = {key} AND moved_to IS NULL AND expires_at IS NULL) AS cur ON true"
            )
        if calls:
            query += ", o.id, o.method, o.payload, o.attempts, o.created_at, o.lease_no, o.has_files"
            joins += " LEFT JOIN o ON true"
        conn = await self._connection()
        with unavailable_on_failure("apply the update"):
            try:
                rows = await conn.fetch(query + joins, *arg.values)
            except (
                asyncpg.UniqueViolationError,
                asyncpg.DeadlockDetectedError,
                asyncpg.DivisionByZeroError,
            ) as exc:
                # The update's id was claimed meanwhile (a redelivery raced us), a locking attempt of it
                # holds what we need, or the row changed under the write: nothing of this statement was
                # applied. Other processes are writing this chat right now: the lock is the way.
                if self._key is not None and not isinstance(exc, asyncpg.UniqueViolationError):
                    self._cache.forget(self._key)
                    self._contended.add(self._key)
                raise self._give_up(f"apply the update: {type(exc).__name__}") from exc
        first = rows[0]
        if not first["applied"]:
            assert self._key is not None
            if self._cached is not None and not self._cached.refreshed:
                # The next attempt starts from the row as it is now, at no extra round trip. (An
                # expired, moved or placeholder row is not remembered: it is read from the database.)
                self._remember(first["cur_revision"], first["cur_data"], first["cur_version"], refreshed=True)
                raise self._give_up(
                    f"session {self._key!r} changed since this process last saw it", StaleRead
                )
            # Refused after a fresh read, or right after a refresh: other processes write this chat as
            # we speak, and taking turns on its row lock is cheaper than racing them.
            self._cache.forget(self._key)
            self._contended.add(self._key)
            raise self._give_up(f"session {self._key!r} changed since it was read")
        if self._write is not _NOT_READ:
            written = self._write
            if written is not None and written[1] is None:
                self._remember(first["revision"], written[0].data, written[0].version)
            else:
                self._remember(None, None, None)  # deleted, or expires: read it from the database
        return pending_calls(rows) if calls else []

    def _remember(
        self, revision: str | None, data: str | None, version: int | None, *, refreshed: bool = False
    ) -> None:
        assert self._key is not None
        if revision is None or data is None or version is None:
            self._cache.forget(self._key)
        else:
            self._cache.put(self._key, StoredSession(data, version), revision, refreshed=refreshed)

    async def finish(self, commit: bool) -> None:
        try:
            if commit and self._refusal is not None:
                raise self._refusal
            if commit and not self._done:
                await self._apply(())
        finally:
            if self._turn is not None:
                self._turns.give_back(self._turn)
                self._turn = None
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    await self._pool.release(conn)
