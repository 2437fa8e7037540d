"""The optimistic transaction: no lock held while the handlers run. It takes two round trips: read,
then one statement that applies the claim, the writes and the replies only if every row read is still
the version read (its `xmin`, with the server's start time: `_revision`), else Conflict and the pipeline
runs the update again in a locking transaction. A row this process remembers (`bot.storage.cache`: the
session and its version as this process last read or wrote it) is not read, and the same statement
checks its version: one round trip in all when every session of the update is remembered, one more per
session that is not. It keeps no state on the connection between transactions, so it works the same
through PgBouncer in transaction mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ...metrics import Metrics
from .. import Conflict, DeadLetter, OutgoingCall, PendingCall, StaleRead, StoredSession, TimerChange
from ..cache import Cached, Contended, SessionCache, Turns
from .outbox import pending_calls, queue_calls
from .statements import Args, acquire, session_columns, unavailable_on_failure
from .timers import CLAIM_TIMER

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


_NOT_WRITTEN: Any = object()


def _write(
    arg: Args, key: str, version: str | None, write: tuple[StoredSession, float | None] | None, after: str
) -> str:
    """An optimistic write of the row at `key` (a parameter) that was read at `version` (an SQL check of
    it; None: there was no row), done only if `after` holds; it writes nothing when the row is another
    version by then."""
    if write is None:
        assert version is not None  # (deleting a row that was not there is no write)
        return f"DELETE FROM sessions WHERE key = {key} AND {version} AND {after}"
    session, ttl = write
    if version is None:
        return (
            "INSERT INTO sessions (key, data, version, expires_at, updated_at)"
            f" SELECT {key}, {arg(session.data)}::jsonb, {arg(session.version)},"
            f" now() + {arg(ttl)}::float8 * interval '1 second', now() WHERE {after}"
            " ON CONFLICT DO NOTHING"
        )
    return (
        f"UPDATE sessions SET data = {arg(session.data)}::jsonb, version = {arg(session.version)},"
        f" expires_at = now() + {arg(ttl)}::float8 * interval '1 second', updated_at = now(),"
        f" moved_to = NULL WHERE key = {key} AND {version} AND {after}"
    )


@dataclass(slots=True)
class _Row:
    """A session row as an optimistic transaction read it: what it answered, the version the statement
    at the end checks, and what that statement writes."""

    session: StoredSession | None  # what read() answered (None: no session)
    revision: str | None  # the row's version when read (`_revision`); None: there was no row
    cached: Cached | None = None  # read() answered from the SessionCache, with no round trip
    write: tuple[StoredSession, float | None] | None = _NOT_WRITTEN  # (session, ttl); None: delete

    @property
    def writes(self) -> bool:
        """Whether the statement changes the row (deleting a row that was not there changes nothing)."""
        return self.write is not _NOT_WRITTEN and not (self.write is None and self.revision is None)


class OptimisticTransaction:
    """Two round trips and no lock held while the handlers run (see the module's docstring); one when
    this process remembers the session (`SessionCache`) and nobody else wrote it since.

    Any number of session rows (a chat's and a user's, say): each is read (one round trip) or remembered
    (none), and the one statement at the end applies the claim and every write only if every row read is
    still the version it was read at (the claim: the update recorded as processed, or a fire's timer
    deleted). What it cannot do that way (a moved session, a redelivery, scheduling a timer, a dead
    letter) raises Conflict before anything is written, and the locking transaction takes over.

    Updates of one key take turns in this process (`Turns`), from the read to the end of the statement,
    so only another process can change a row under an attempt. Only the first key's turn is waited for.
    A transaction holding a turn that waited for another could wait forever: for an update taking the
    same two keys in the other order, or for one holding the second key's turn while it waits for the
    pooled connection this one holds. So when a later key's turn is another update's, the update gives
    up and runs with locks, which take rows in one order and wait for the database, bounded.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        acquire_timeout: float,
        metrics: Metrics | None,
        cache: SessionCache,
        turns: Turns,
        contended: Contended,
        lock_timeout: str,
    ) -> None:
        """`lock_timeout`: DB_LOCK_TIMEOUT as a PostgreSQL setting's value ('5000ms'), for the statement."""
        self._pool = pool
        self._lock_timeout = lock_timeout
        self._acquire_timeout = acquire_timeout
        self._metrics = metrics
        self._cache = cache  # what this process remembers of sessions, shared by its transactions
        self._turns = turns
        self._contended = contended
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None
        self._claim: tuple[int, int] | None = None  # (bot, update id) to record as processed
        self._timer: tuple[int, int] | None = None  # (bot, timer id) of a fire, to delete
        self._rows: dict[str, _Row] = {}  # by key, in the order read
        self._held: list[str] = []  # the keys whose turns this transaction holds, the first waited for
        self._asked_applied = False  # a read asked whether the claimed update was applied before
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
            self._conn = await acquire(self._pool, self._acquire_timeout, self._metrics)
        return self._conn

    async def claim_update(self, bot_id: int, update_id: int) -> bool:
        self._claim = (bot_id, update_id)  # applied at the end, and only with the writes
        return True

    async def _take_turn(self, key: str) -> None:
        turns = self._turns
        if self._held and turns.busy(key):
            raise self._give_up(
                f"session {key!r} is another update's turn, and this one holds {self._held[0]!r}:"
                " run it with locks"
            )
        await turns.take(key)
        self._held.append(key)

    async def read(self, key: str) -> StoredSession | None:
        if self._refusal is not None:
            raise self._refusal
        known = self._rows.get(key)
        if known is not None:  # read twice: the same answer, checked once at the end
            return known.session
        if key in self._contended:
            raise self._give_up(f"session {key!r} is contended: run it with locks")
        await self._take_turn(key)
        cached = self._cache.get(key)
        if cached is not None:
            # No round trip: the statement at the end checks the version, as it would after a read. A
            # redelivery is not told apart here but by its claim there (a conflict, then the lock).
            self._rows[key] = _Row(cached.session, cached.revision, cached)
            return cached.session
        conn = await self._connection()
        arg = Args()
        applied = "false"
        if self._claim is not None and not self._asked_applied:
            applied = f"EXISTS (SELECT FROM processed_updates WHERE bot_id = {arg(self._claim[0])} AND update_id = {arg(self._claim[1])})"
        with unavailable_on_failure(f"read session {key!r}"):
            row = await conn.fetchrow(
                f"SELECT {applied} AS done, {_revision('s.')} AS revision, s.moved_to, s.expires_at IS NULL AS lasting,"
                f" {session_columns('s.')}"
                f" FROM (VALUES (1)) AS one LEFT JOIN sessions AS s ON s.key = {arg(key)}",
                *arg.values,
            )
        assert row is not None  # the outer join returns one row
        self._asked_applied = self._claim is not None
        if row["done"]:
            raise self._give_up("a redelivered update: the locking transaction tells it apart")
        if row["moved_to"] is not None and not row["expired"]:
            raise self._give_up(f"session {key!r} moved: following it takes the locking transaction")
        session = None
        if row["data"] is not None and not row["expired"]:
            session = StoredSession(row["data"], row["version"])
            if row["lasting"]:
                self._cache.put(key, session, row["revision"])
        self._rows[key] = _Row(session, row["revision"])
        return session

    async def write(self, key: str, session: StoredSession, ttl: float | None = None) -> None:
        self._read_before(key).write = (session, ttl)

    async def delete(self, key: str) -> None:
        self._read_before(key).write = None

    async def move(self, key: str, to: str, keep: float) -> None:
        raise self._give_up(f"moving session {key!r}: run it with locks")

    def _read_before(self, key: str) -> _Row:
        row = self._rows.get(key)
        if row is None:
            raise self._give_up(f"session {key!r} written without being read: run it with locks")
        return row

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
        # Deleted at the end, with the writes; a fire whose timer is gone by then (another process
        # fired it) applies nothing, and the locking transaction tells it apart.
        self._timer = (bot_id, timer_id)
        return True

    async def _apply(
        self, calls: Sequence[OutgoingCall], bot_id: int = 0, update_id: int = 0, lease: float = 0.0
    ) -> list[PendingCall]:
        """The one statement that applies everything, each part only if the one before it did: the
        claim (if every row read is still the version read: `v`, in the statement's snapshot), the
        writes (each checking its row's version again as it writes), then the replies. Every row read
        is checked, written or not (its value was used); the rows that failed the check are named in
        the answer, with the current version of each remembered one, to refresh the cache.

        The claim comes first, as in the locking transaction: both take the update id's index entry
        before the session rows, so a redelivery running with locks in another process cannot hold one
        while waiting for the other (the reverse order deadlocked there: 1 s stalls and a 503, measured
        on workload C with two processes). The writes follow in key order, the order the locking
        transaction locks rows in."""
        if self._refusal is not None:
            raise self._refusal
        self._done = True
        keys = list(self._rows)
        written = sorted(key for key in keys if self._rows[key].writes)
        if self._claim is None and self._timer is None and not written and not calls:
            return []  # nothing to apply
        arg = Args()
        query = self._statement(arg, keys, written, calls, bot_id, update_id, lease)
        conn = await self._connection()
        with unavailable_on_failure("apply the update"):
            try:
                rows = await conn.fetch(query, *arg.values)
            except (
                asyncpg.UniqueViolationError,
                asyncpg.DeadlockDetectedError,
                asyncpg.DivisionByZeroError,
            ) as exc:
                # The update's id was claimed meanwhile (a redelivery raced us), a locking attempt of it
                # holds what we need, or a row changed under a write: nothing of this statement was
                # applied. Other processes are writing these chats right now: the lock is the way.
                if not isinstance(exc, asyncpg.UniqueViolationError):
                    for key in keys:
                        self._cache.forget(key)
                        self._contended.add(key)
                raise self._give_up(f"apply the update: {type(exc).__name__}") from exc
        first = rows[0]
        if not first["applied"]:
            if all(first[f"u{n}"] for n in range(len(keys))):
                assert self._timer is not None  # else every row unchanged means applied (or raised)
                raise self._give_up("the timer is gone (fired, replaced or cancelled): run it with locks")
            raise self._refused(keys, first)
        for n, key in enumerate(written):
            write = self._rows[key].write
            if write is not None and write[1] is None:
                self._remember(key, first[f"r{n}"], write[0].data, write[0].version)
            else:
                self._cache.forget(key)  # deleted, or expires: read it from the database
        return pending_calls(rows) if calls else []

    def _statement(
        self,
        arg: Args,
        keys: list[str],
        written: list[str],
        calls: Sequence[OutgoingCall],
        bot_id: int,
        update_id: int,
        lease: float,
    ) -> str:
        """`_apply`'s statement. Its answer: `applied`; `u<n>`, whether keys[n] is unchanged; `r<n>`, the
        new version of written[n]; `k<n>_…`, the row of keys[n] as it is now, when it was remembered;
        and one row per call queued."""
        gate = None
        key_arg = {key: arg(key) for key in keys}
        version = {
            key: f"{_revision()} = {arg(row.revision)}"
            for key, row in self._rows.items()
            if row.revision is not None
        }
        checks = (
            f"EXISTS (SELECT FROM sessions WHERE key = {key_arg[key]} AND {version[key]})"
            if key in version
            else f"NOT EXISTS (SELECT FROM sessions WHERE key = {key_arg[key]})"
            for key in keys
        )
        # DB_LOCK_TIMEOUT, set for this statement's own (implicit) transaction by the CTE every other part
        # waits for: a row or an update id held by someone else (a locking transaction, a `SELECT … FOR
        # UPDATE` in psql) ends it with LockNotAvailable after that long, as in the locking transaction,
        # instead of at the request's deadline. In the statement itself: no round trip, and no setting left
        # on a connection, which a transaction-mode pooler would not keep (nor take as a startup parameter).
        limit = f"set_config('lock_timeout', '{self._lock_timeout}', true) AS lock_timeout"
        ctes = [
            f"v AS (SELECT {', '.join([limit, *(f'{check} AS u{n}' for n, check in enumerate(checks))])})"
        ]
        unchanged = " AND ".join(f"v.u{n}" for n in range(len(keys))) or "true"
        if self._claim is not None:
            ctes.append(
                f"c AS (INSERT INTO processed_updates (bot_id, update_id) SELECT {arg(self._claim[0])},"
                f" {arg(self._claim[1])} FROM v WHERE {unchanged} RETURNING 1)"
            )
            gate = "c"
        elif self._timer is not None:
            # Gated on v even with no keys (`unchanged` is then true): v sets the lock timeout first.
            claim = CLAIM_TIMER.format(arg(self._timer[0]), arg(self._timer[1]))
            ctes.append(f"c AS ({claim} AND EXISTS (SELECT FROM v WHERE {unchanged}) RETURNING 1)")
            gate = "c"
        elif keys:
            ctes.append(f"c AS (SELECT FROM v WHERE {unchanged})")
            gate = "c"
        for n, key in enumerate(written):
            assert gate is not None  # a key written was read, hence checked in c
            write, after = self._rows[key].write, f"EXISTS (SELECT FROM {gate})"
            ctes.append(
                f"w{n} AS ({_write(arg, key_arg[key], version.get(key), write, after)} RETURNING {_revision()} AS revision)"
            )
            gate = f"w{n}"
        if calls:
            where = f" WHERE EXISTS (SELECT FROM {gate})" if gate else ""
            ctes.append(f"o AS ({queue_calls(arg, bot_id, update_id, lease, calls, where)})")
        columns = [f"EXISTS (SELECT FROM {gate}) AS applied" if gate else "true AS applied"]
        joins = " FROM v"
        columns += [f"v.u{n}" for n in range(len(keys))]
        columns += [f"(SELECT revision FROM w{n}) AS r{n}" for n in range(len(written))]
        if written:
            # Checked, but a row changed between the statement's snapshot and its write (another process
            # committed in between): the chain of writes broke there, and a division by zero rolls the
            # whole statement back, so that neither the claim nor the other writes stay without it. (A
            # count, not a constant 1/0, which the planner would fold and raise every time.)
            columns.append(
                f"CASE WHEN EXISTS (SELECT FROM c) THEN 1 / (SELECT count(*)::int FROM w{len(written) - 1}) END AS torn"
            )
        for n, key in enumerate(keys):
            if self._rows[key].cached is not None:
                # Read in the statement's snapshot, before its own writes: the row as it is now.
                columns.append(
                    f"k{n}.revision AS k{n}_revision, k{n}.data AS k{n}_data, k{n}.version AS k{n}_version"
                )
                joins += (
                    f" LEFT JOIN (SELECT {_revision()} AS revision, data::text AS data, version FROM sessions"
                    f" WHERE key = {key_arg[key]} AND moved_to IS NULL AND expires_at IS NULL) AS k{n} ON true"
                )
        if calls:
            columns.append("o.id, o.method, o.payload, o.attempts, o.created_at, o.lease_no, o.has_files")
            joins += " LEFT JOIN o ON true"
        return f"WITH {', '.join(ctes)} SELECT {', '.join(columns)}{joins}"

    def _refused(self, keys: list[str], found: asyncpg.Record) -> Conflict:
        """The statement applied nothing: rows among `keys` changed since they were read or remembered.
        A remembered one is refreshed from the row as it is now, which came back with the refusal: when
        every changed row was one of those, the next attempt (StaleRead) starts from them at no extra
        round trip. A row that changed after a fresh read, or right after a refresh, is being written by
        other processes as we speak, and taking turns on its row lock is cheaper than racing them. (An
        expired, moved or placeholder row is not remembered: it is read from the database.)"""
        changed, stale = [], True
        for n, key in enumerate(keys):
            if found[f"u{n}"]:
                continue
            changed.append(key)
            cached = self._rows[key].cached
            if cached is not None and not cached.refreshed:
                prefix = f"k{n}_"
                self._remember(
                    key,
                    found[prefix + "revision"],
                    found[prefix + "data"],
                    found[prefix + "version"],
                    refreshed=True,
                )
            else:
                stale = False
                self._cache.forget(key)
                self._contended.add(key)
        assert changed  # with every row unchanged, the claim and the writes applied, or the statement raised
        names = ", ".join(map(repr, changed))
        if stale:
            return self._give_up(f"session {names} changed since this process last saw it", StaleRead)
        return self._give_up(f"session {names} changed since it was read")

    def _remember(
        self,
        key: str,
        revision: str | None,
        data: str | None,
        version: int | None,
        *,
        refreshed: bool = False,
    ) -> None:
        if revision is None or data is None or version is None:
            self._cache.forget(key)
        else:
            self._cache.put(key, StoredSession(data, version), revision, refreshed=refreshed)

    async def finish(self, commit: bool) -> None:
        try:
            if commit and self._refusal is not None:
                raise self._refusal
            if commit and not self._done:
                await self._apply(())
        finally:
            held, self._held = self._held, []
            for key in held:
                self._turns.give_back(key)
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    await self._pool.release(conn)
