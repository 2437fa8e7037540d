"""PostgreSQL storage on an asyncpg pool: where the bot's correctness lives.

One update is one transaction on one pooled connection, in three round trips when it changes a session
and sends nothing (an increment), four when it queues replies:

    BEGIN; SET LOCAL lock_timeout ...; INSERT processed_updates ...  -- 1: one message: the timeouts
                                              --    live in the transaction; claim (a redelivery waits here)
    INSERT sessions ... ON CONFLICT DO UPDATE -- 2: lock the session row, created if missing, and read it
    ... handlers run ...
    [INSERT outbox ... RETURNING]             -- (3: the replies, leased to this process, with the writes)
    INSERT sessions ... ; COMMIT              -- 3: the writes and the commit (then replies are sent)

Lock order inside a transaction is: the update id's unique index entry, then session rows in the order
the session layer reads them (sorted, when it needs several). The only waits are on those, bounded by
`lock_timeout`; every failure of the database or the connection becomes StorageUnavailable (503, and
Telegram delivers the update again), except a value the database refuses, which becomes StorageRefused
(the same value would be refused on every delivery: the update becomes a dead letter).

`optimistic_transaction()` takes two round trips and no lock: read, then one statement that applies
the claim, the write and the replies only if the row is still the version read (its `xmin`, with the
server's start time: `_revision`), else Conflict and the pipeline runs the update again in a locking
transaction. It takes one round trip when this process remembers the row (`bot.storage.cache`: the
session and its version as this process last read or wrote it): the read is skipped, and the same
statement checks the version. Both keep no state
on the connection between transactions, so they work the same through PgBouncer in transaction mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from ..files import Upload, pack_uploads, unpack_uploads
from ..metrics import Metrics
from ..migrate import NotMigrated, check_migrated
from ..pooler import NO_STATEMENT_CACHE, broken_prepared_statement, pools_transactions, transaction_pooler
from . import (
    Budget,
    Conflict,
    DeadLetter,
    DueTimer,
    FloodRule,
    Moved,
    OutboxStatus,
    OutgoingCall,
    PendingCall,
    Reservation,
    RunAgain,
    StaleRead,
    StorageRefused,
    StorageUnavailable,
    StoredSession,
    TimerChange,
)
from .cache import Cached, SessionCache, Turns

__all__ = ["PostgresStorage", "SessionRow"]

log = logging.getLogger("bot.storage")
T = TypeVar("T")


# What the database refuses in a value, whenever it is sent: data exceptions (class 22: jsonb and text
# refusing NUL, numbers out of range...), values over its limits (class 54: a key too long for the index,
# a jsonb over 255 MB), and arguments asyncpg cannot encode. The same value is refused on every delivery.
_REFUSED = (asyncpg.DataError, asyncpg.ProgramLimitExceededError, asyncpg.exceptions._base.DataError)


@contextmanager
def _unavailable_on_failure(what: str) -> Iterator[None]:
    """Whatever else the driver raises here (a lost connection, a timeout, a terminated backend, a
    protocol state error after one, a missing table), the update was not stored. Reporting it as
    StorageUnavailable makes the webhook answer 503 and Telegram deliver the update again; treating it
    as a bug would dead-letter an update that its next delivery would apply. A refused value is
    StorageRefused: delivering it again cannot help (the update becomes a dead letter)."""
    try:
        yield
    except (StorageUnavailable, StorageRefused, Conflict):
        raise
    except _REFUSED as exc:
        raise StorageRefused(f"{what}: the database refused a value: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise StorageUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc


# What every query handing calls to a sender returns, for _pending(): whether a call has files, not
# the files (008).
_CALL = (
    "id, method, payload::text AS payload, attempts, extract(epoch FROM created_at)::float8 AS created_at,"
    " lease_no, files IS NOT NULL AS has_files"
)


async def _acquire(pool: asyncpg.Pool, wait_limit: float) -> asyncpg.pool.PoolConnectionProxy:
    # With a connection idle, acquiring cannot wait, and asyncio.wait_for (a task per call) was ~2% of
    # a request's CPU in py-spy on workload T; the request deadline still bounds the rare lost race.
    if pool.get_idle_size():
        return await pool.acquire()
    return await pool.acquire(timeout=wait_limit)


_DEAD_LETTER = "update_id, chat, kind, body, error, traceback, attempts, extract(epoch FROM failed_at)::float8 AS failed_at"


def _dead_letter(row: asyncpg.Record) -> DeadLetter:
    return DeadLetter(**dict(row))


def _pending(rows: Sequence[asyncpg.Record]) -> list[PendingCall]:
    return [
        PendingCall(
            r["id"],
            r["method"],
            json.loads(r["payload"]),
            r["created_at"],
            r["attempts"],
            r["lease_no"],
            r["has_files"],
        )
        for r in sorted(rows, key=lambda r: r["id"])
        if r["id"] is not None
    ]


def _literal(value: str) -> str:
    """`value` as an SQL string literal, for statements sent with the simple-query protocol (the only
    one that carries several statements, hence a COMMIT, in one round trip). An E'' literal reads
    backslashes the same whatever standard_conforming_strings says."""
    if "\x00" in value:
        raise ValueError("NUL cannot be sent in a query")
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _literal_value(value: str | int | float | None) -> str:
    """A session write's value (key, data, version or ttl) as SQL text, for the simple-query COMMIT."""
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return _literal(value)
    return repr(value)  # an int or a float: digits (and '.', 'e', '-') only


# Stores a session (ttl NULL: no expiry); the upsert whoever holds the row, the insert only if none does.
_INSERT = (
    "INSERT INTO sessions (key, data, version, expires_at, updated_at)"
    " VALUES ({key}, {data}::jsonb, {version}, now() + {ttl}::float8 * interval '1 second', now())"
)
_UPSERT = _INSERT + (
    " ON CONFLICT (key) DO UPDATE SET data = EXCLUDED.data, version = EXCLUDED.version,"
    " expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at, moved_to = NULL"
)


def _queue(
    arg: _Args, bot_id: int, update_id: int, lease: float, calls: Sequence[OutgoingCall], where: str = ""
) -> str:
    """The INSERT that queues calls (leased to the caller), returning them as `_pending` reads them. A
    bytea[] of files only when a call has some: asyncpg looks that array type up on a connection's first
    use of it, a round trip that updates without files do not pay."""
    files, column = "", "NULL::bytea"
    if any(c.files for c in calls):
        files, column = f", {arg([pack_uploads(c.files) for c in calls])}::bytea[]", "c.files"
    return (
        "INSERT INTO outbox (bot_id, update_id, method, payload, files, lease_until)"
        f" SELECT {arg(bot_id)}, {arg(update_id)}, c.method, c.payload::jsonb, {column},"
        f" now() + {arg(lease)} * interval '1 second'"
        f" FROM unnest({arg([c.method for c in calls])}::text[], {arg([json.dumps(c.params) for c in calls])}::text[]{files})"
        f" WITH ORDINALITY AS c(method, payload{', files' if files else ''}, n){where}"
        f" ORDER BY c.n RETURNING {_CALL}"
    )


_SESSION_COLUMNS = "data::text AS data, version, expires_at <= now() AS expired"

# The claims: the first statement of a transaction (riding with its BEGIN), or after its writes.
_CLAIM_UPDATE = "INSERT INTO processed_updates (bot_id, update_id) VALUES ({}, {}) ON CONFLICT DO NOTHING"
_CLAIM_TIMER = "DELETE FROM timers WHERE bot_id = {} AND id = {} AND failed_at IS NULL"

# Schedules a timer, or replaces the one of the same key and name with a new id (see 007_timers.sql).
_SCHEDULE = (
    "INSERT INTO timers (bot_id, key, name, handler, payload, origin, due_at)"
    " VALUES ({bot}, {key}, {name}, {handler}, {payload}::jsonb, {origin}::jsonb,"
    " coalesce(to_timestamp({at}::float8), now() + coalesce({after}::float8, 0) * interval '1 second'))"
    " ON CONFLICT (bot_id, key, name) DO UPDATE SET id = DEFAULT, handler = EXCLUDED.handler,"
    " payload = EXCLUDED.payload, origin = EXCLUDED.origin, due_at = EXCLUDED.due_at, created_at = now(),"
    " lease_until = '-infinity', failed_at = NULL, last_error = NULL"
)
_CANCEL = "DELETE FROM timers WHERE bot_id = {bot} AND key = {key} AND name = {name}"
# How many due timers one pick looks at to find each key's earliest: every key with a timer among them
# has its earliest among them too, so no key's timers fire out of order, however few are looked at.
_TIMER_WINDOW = 1000


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


class _Args:
    """Numbered parameters ($1, $2, ...) for a statement assembled from parts."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


class _PostgresTransaction:
    """Begins on first use: an update that touches no session never takes a connection.

    Writes wait in `_writes` until the next statement, so they ride with the replies or the COMMIT
    instead of costing a round trip each (measured: 5 to 6 round trips per update before, 3 now).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        acquire_timeout: float,
        metrics: Metrics | None,
        begin: str,
        forget: Callable[[str], None],
    ) -> None:
        self._pool = pool
        self._forget = forget  # what the optimistic transactions remember of a key it writes is stale
        self._acquire_timeout = acquire_timeout
        self._metrics = metrics
        self._begin = begin
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None
        self._begun = False
        # key -> (session, ttl) to store, or None to delete; applied in this order before anything else.
        self._writes: dict[str, tuple[StoredSession, float | None] | None] = {}
        # Rows this transaction inserted only to have something to lock; removed before commit unless
        # written, so "no session" stays "no row".
        self._placeholders: set[str] = set()
        # Timers to schedule or cancel, riding with the writes: by (bot, key, name), the last change
        # only, since one statement's parts do not see each other's rows.
        self._timers: dict[tuple[int, str, str], TimerChange] = {}

    async def _connection(self, begin: bool = True) -> asyncpg.pool.PoolConnectionProxy:
        if self._conn is None:
            started = time.perf_counter()
            with _unavailable_on_failure("acquire a connection"):
                self._conn = await _acquire(self._pool, self._acquire_timeout)
            if self._metrics is not None:
                self._metrics.pool_wait.observe(time.perf_counter() - started)
        if begin and not self._begun:
            with _unavailable_on_failure("begin"):
                await self._conn.execute(self._begin)
            self._begun = True
        return self._conn

    def _take_writes(self, value: Callable[[Any], str]) -> list[str]:
        """The pending writes as statements, each value turned into SQL by `value` (a parameter of one
        statement being assembled, or a literal), and forget them. Raises (a NUL in a literal) before
        forgetting anything."""
        statements = []
        for key, write in self._writes.items():
            self._forget(key)
            if write is None:
                statements.append(f"DELETE FROM sessions WHERE key = {value(key)}")
            else:
                session, ttl = write
                statements.append(
                    _UPSERT.format(
                        key=value(key),
                        data=value(session.data),
                        version=value(session.version),
                        ttl=value(ttl),
                    )
                )
        self._placeholders -= self._writes.keys()  # written: no longer a placeholder to remove
        self._writes.clear()
        for (bot_id, key, name), change in self._timers.items():
            where = {"bot": value(bot_id), "key": value(key), "name": value(name)}
            if change.handler is None:
                statements.append(_CANCEL.format(**where))
            else:
                statements.append(
                    _SCHEDULE.format(
                        **where,
                        handler=value(change.handler),
                        payload=value(change.payload),
                        origin=value(change.origin),
                        at=value(change.at),
                        after=value(change.after),
                    )
                )
        self._timers.clear()
        return statements

    def _writes_as_ctes(self, arg: _Args) -> str:
        """The pending writes as data-modifying CTEs (`WITH …, ` or nothing), to ride with a statement."""
        ctes = [f"w{n} AS ({sql})" for n, sql in enumerate(self._take_writes(arg))]
        return f"WITH {', '.join(ctes)} " if ctes else ""

    async def _flush(self) -> None:
        if self._writes or self._timers:
            conn = await self._connection()
            arg = _Args()
            with _unavailable_on_failure("write sessions"):
                # One statement for all of them: its parameters are numbered across every write.
                await conn.execute(self._writes_as_ctes(arg) + "SELECT", *arg.values)

    async def claim_update(self, bot_id: int, update_id: int) -> bool:
        return await self._claim(_CLAIM_UPDATE, "claim update", bot_id, update_id) == "INSERT 0 1"

    async def claim_timer(self, bot_id: int, timer_id: int) -> bool:
        # The row stays locked to the end: a second process firing the same timer waits here, and finds
        # it gone once this one commits.
        return await self._claim(_CLAIM_TIMER, "claim timer", bot_id, timer_id) == "DELETE 1"

    async def _claim(self, claim: str, what: str, bot_id: int, unit_id: int) -> str:
        conn = await self._connection(begin=False)
        with _unavailable_on_failure(what):
            if self._begun:
                await self._flush()
                status: str = await conn.execute(claim.format("$1", "$2"), bot_id, unit_id)
            else:
                # BEGIN (and its SET LOCALs) ride with the claim as one simple query (ints only: safe literals).
                status = await conn.execute(self._begin + "; " + claim.format(int(bot_id), int(unit_id)))
                self._begun = True
        return status

    async def read(self, key: str) -> StoredSession | Moved | None:
        await self._flush()
        conn = await self._connection()
        with _unavailable_on_failure(f"read session {key!r}"):
            # A missing row cannot be locked, so the first two updates of a new chat would both see
            # "nothing" and both insert. The upsert locks the row in one statement whether it exists or
            # not: a placeholder (data NULL) is inserted for a new key, and the loser of that INSERT race
            # waits for the winner's commit, then locks the winner's row and reads its newest data.
            # moved_to rides along: a chat that moved costs no extra query to find out (002).
            started = time.perf_counter()
            row = await conn.fetchrow(
                "INSERT INTO sessions (key) VALUES ($1) ON CONFLICT (key) DO UPDATE SET key = EXCLUDED.key"
                f" RETURNING {_SESSION_COLUMNS}, moved_to",
                key,
            )
            if self._metrics is not None:
                self._metrics.lock_wait.observe(time.perf_counter() - started)
        assert row is not None  # an upsert returns its row
        if row["expired"]:
            return None
        if row["moved_to"] is not None:
            return Moved(row["moved_to"])
        if row["data"] is None:
            self._placeholders.add(key)
            return None
        return StoredSession(row["data"], row["version"])

    async def write(self, key: str, session: StoredSession, ttl: float | None = None) -> None:
        self._writes.pop(key, None)  # keeps the order of the last operation per key
        self._writes[key] = (session, ttl)

    async def delete(self, key: str) -> None:
        self._writes.pop(key, None)
        self._writes[key] = None

    async def move(self, key: str, to: str, keep: float) -> None:
        await self._flush()  # a move is rare (a group's upgrade): its own round trip, after the writes
        self._writes.pop(key, None)
        self._forget(key)
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
        arg = _Args()
        # The writes ride along as data-modifying CTEs: one round trip for both.
        writes = self._writes_as_ctes(arg)
        insert = _queue(arg, bot_id, update_id, lease, calls)
        with _unavailable_on_failure("queue replies"):
            rows = await conn.fetch(writes + insert, *arg.values)
        return _pending(rows)

    async def schedule(self, bot_id: int, changes: Sequence[TimerChange]) -> None:
        for change in changes:
            self._timers.pop((bot_id, change.key, change.name), None)  # keeps the order of the last one
            self._timers[bot_id, change.key, change.name] = change

    async def claim_unsent(self, bot_id: int, update_id: int, lease: float) -> list[PendingCall]:
        await self._flush()
        conn = await self._connection()
        with _unavailable_on_failure("claim unsent replies"):
            rows = await conn.fetch(
                "UPDATE outbox SET lease_until = now() + $3 * interval '1 second', lease_no = lease_no + 1"
                " WHERE bot_id = $1 AND update_id = $2 AND sent_at IS NULL AND failed_at IS NULL"
                f" AND lease_until <= now() RETURNING {_CALL}",
                bot_id,
                update_id,
                lease,
            )
        return _pending(rows)

    async def dead_letter(self, bot_id: int, letter: DeadLetter) -> None:
        await self._flush()
        conn = await self._connection()
        with _unavailable_on_failure("record a dead letter"):
            # Replacing a letter left from long ago: update ids are claimed only for 25 h (prune), and
            # Telegram may number a bot's updates afresh after a week.
            await conn.execute(
                "INSERT INTO dead_letters (bot_id, update_id, chat, kind, body, error, traceback, attempts)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (bot_id, update_id) DO UPDATE SET"
                " chat = EXCLUDED.chat, kind = EXCLUDED.kind, body = EXCLUDED.body, error = EXCLUDED.error,"
                " traceback = EXCLUDED.traceback, attempts = EXCLUDED.attempts, failed_at = now()",
                bot_id,
                letter.update_id,
                letter.chat,
                letter.kind,
                letter.body,
                letter.error,
                letter.traceback,
                letter.attempts,
            )

    async def take_dead_letter(self, bot_id: int, update_id: int) -> DeadLetter | None:
        await self._flush()
        conn = await self._connection()
        with _unavailable_on_failure("take a dead letter"):
            # The delete locks the row: a second replay waits here, then finds it gone.
            row = await conn.fetchrow(
                f"DELETE FROM dead_letters WHERE bot_id = $1 AND update_id = $2 RETURNING {_DEAD_LETTER}",
                bot_id,
                update_id,
            )
        return None if row is None else _dead_letter(row)

    def _commit_script(self) -> str:
        """The pending writes, the placeholder clean-up and COMMIT as one simple query (ValueError when
        a value cannot travel as a literal)."""
        statements = self._take_writes(_literal_value)
        if self._placeholders:
            keys = ", ".join(_literal(k) for k in sorted(self._placeholders))
            statements.append(f"DELETE FROM sessions WHERE key IN ({keys}) AND data IS NULL")
        statements.append("COMMIT")
        return "; ".join(statements)

    async def finish(self, commit: bool) -> None:
        """Commit or roll back, and always give the connection back to the pool."""
        try:
            if commit and (self._begun or self._writes or self._timers):
                conn = await self._connection(begin=False)
                with _unavailable_on_failure("commit"):
                    try:
                        script = self._commit_script()
                    except ValueError:
                        await self._flush()  # a NUL in a value: sent as parameters instead
                        script = self._commit_script()
                    try:
                        await conn.execute(script if self._begun else self._begin + "; " + script)
                    except Exception:
                        with contextlib.suppress(Exception):
                            await conn.execute("ROLLBACK")  # a script that failed left it aborted
                        raise
            elif self._begun and self._conn is not None:
                await self._conn.execute("ROLLBACK")
        finally:
            # A connection broken mid-transaction fails its reset on release and is terminated by the
            # pool, not reused; that failure says nothing about this transaction's outcome.
            held, self._conn = self._conn, None
            if held is not None:
                with contextlib.suppress(Exception):
                    await self._pool.release(held)


async def _asks_the_server(dsn: str, connect_kwargs: dict[str, Any]) -> bool:
    """DB_POOLER=auto with a URL it does not know: whether a transaction-mode pooler answers there
    (bot.pooler), asked on connections of their own that keep no named statement (a pooler's server
    session may hold another client's)."""
    pooled = await pools_transactions(lambda: asyncpg.connect(dsn, **connect_kwargs, **NO_STATEMENT_CACHE))
    if pooled:
        log.info(
            "DATABASE_URL goes through a connection pooler in transaction mode: no prepared statements are"
            " kept on the server, as with DB_POOLER=transaction"
        )
    return pooled


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset on release: this storage never LISTENs, SETs, holds cursors or advisory locks
    (nothing survives a transaction, as PgBouncer's transaction mode requires), and an open transaction
    is rolled back by the pool before this runs. asyncpg's default reset is one more round trip per
    update (`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`)."""


_NOT_READ: Any = object()


class _OptimisticTransaction:
    """Two round trips and no lock held while the handlers run (see the module's docstring); one when
    this process remembers the session (`SessionCache`) and nobody else wrote it since.

    Handles one session key per update, the common shape; anything else (a second key, a redelivery)
    raises Conflict before writing anything, and the locking transaction takes over. Updates of one key
    take turns in this process (`Turns`), from the read to the end of the statement, so only another
    process can change a row under an attempt.
    """

    def __init__(self, storage: PostgresStorage) -> None:
        self._storage = storage
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
            with _unavailable_on_failure("acquire a connection"):
                self._conn = await _acquire(self._storage.pool, self._storage.acquire_timeout)
            if self._storage.metrics is not None:
                self._storage.metrics.pool_wait.observe(time.perf_counter() - started)
        return self._conn

    async def claim_update(self, bot_id: int, update_id: int) -> bool:
        self._claim = (bot_id, update_id)  # applied at the end, and only with the writes
        return True

    async def read(self, key: str) -> StoredSession | None:
        if self._key is not None and key != self._key:
            raise self._give_up("several sessions in one update: run it with locks")
        if self._storage.contended(key):
            raise self._give_up(f"session {key!r} is contended: run it with locks")
        if self._turn != key:  # (a key read twice in one transaction: one turn for both reads)
            await self._storage.turns.take(key)
            self._turn = key
        cached = self._storage.cache.get(key)
        if cached is not None:
            # No round trip: the statement at the end checks the version, as it would after a read. A
            # redelivery is not told apart here but by its claim there (a conflict, then the lock).
            self._key, self._revision, self._cached = key, cached.revision, cached
            return cached.session
        conn = await self._connection()
        arg = _Args()
        done = "false"
        if self._claim is not None:
            done = f"EXISTS (SELECT FROM processed_updates WHERE bot_id = {arg(self._claim[0])} AND update_id = {arg(self._claim[1])})"
        with _unavailable_on_failure(f"read session {key!r}"):
            row = await conn.fetchrow(
                f"SELECT {done} AS done, {_revision('s.')} AS revision, s.moved_to, s.expires_at IS NULL AS lasting,"
                f" s.{_SESSION_COLUMNS.replace(', ', ', s.')}"
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
            self._storage.cache.put(key, session, row["revision"])
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
        arg, ctes, gate = _Args(), [], None
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
            ctes.append(f"o AS ({_queue(arg, bot_id, update_id, lease, calls, where)})")
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
        with _unavailable_on_failure("apply the update"):
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
                    self._storage.cache.forget(self._key)
                    self._storage.contend(self._key)
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
            self._storage.cache.forget(self._key)
            self._storage.contend(self._key)
            raise self._give_up(f"session {self._key!r} changed since it was read")
        if self._write is not _NOT_READ:
            written = self._write
            if written is not None and written[1] is None:
                self._remember(first["revision"], written[0].data, written[0].version)
            else:
                self._remember(None, None, None)  # deleted, or expires: read it from the database
        return _pending(rows) if calls else []

    def _remember(
        self, revision: str | None, data: str | None, version: int | None, *, refreshed: bool = False
    ) -> None:
        assert self._key is not None
        if revision is None or data is None or version is None:
            self._storage.cache.forget(self._key)
        else:
            self._storage.cache.put(self._key, StoredSession(data, version), revision, refreshed=refreshed)

    async def finish(self, commit: bool) -> None:
        try:
            if commit and self._refusal is not None:
                raise self._refusal
            if commit and not self._done:
                await self._apply(())
        finally:
            if self._turn is not None:
                self._storage.turns.give_back(self._turn)
                self._turn = None
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    await self._storage.pool.release(conn)


_Tx = TypeVar("_Tx", _PostgresTransaction, _OptimisticTransaction)


@asynccontextmanager
async def _finished(tx: _Tx, storage: PostgresStorage) -> AsyncIterator[_Tx]:
    """Yield the transaction; commit it when the block ends, roll it back when anything raised.

    What this process remembers of sessions outlives a failure: a remembered row version names its
    server too (`_revision`), so one remembered from before a restore or a failover never matches.
    When a pooler broke a prepared statement, the storage switches to pooler mode and RunAgain asks
    for the update again."""
    try:
        yield tx
    except BaseException as exc:
        # Rolling back on a broken connection fails too; the original error is the one to report,
        # and release() in finish() still returns (or discards) the connection.
        with contextlib.suppress(Exception):
            await tx.finish(commit=False)
        await storage.run_again_if_pooler_broke(exc)
        raise
    try:
        await tx.finish(commit=True)
    except StorageUnavailable as exc:
        await storage.run_again_if_pooler_broke(exc)
        raise


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

    # How long a session whose optimistic write lost a race is run with locks straight away: a hot chat
    # would otherwise run most of its updates twice.
    CONTENDED_FOR = 5.0

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        dsn: str,
        connect_kwargs: dict[str, Any],
        acquire_timeout: float = 5.0,
        lock_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        metrics: Metrics | None = None,
        cache_size: int = 5000,
    ) -> None:
        """`pool` connects to `dsn` with `connect_kwargs`; with `NO_STATEMENT_CACHE` among them, in
        pooler mode already."""
        self._pool = pool
        # To reconnect the pool in pooler mode (`run_again_if_pooler_broke`).
        self._dsn, self._connect_kwargs = dsn, connect_kwargs
        self._pooler_mode = connect_kwargs.get("statement_cache_size") == 0
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
        self._contended: dict[str, float] = {}  # key -> until when (monotonic)
        # The optimistic transaction's memory of sessions and its per-key turns (bot.storage.cache).
        self.cache = SessionCache(cache_size)
        self.turns = Turns()

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
        cache_size: int = 5000,
    ) -> PostgresStorage:
        """Open a pool. Connections are made lazily after the first, so a database that is down at
        start-up is reported here, and one that goes away later is reconnected by the pool.

        `pooler` is DB_POOLER: behind a transaction-mode pooler no statement is cached on the server.
        With `auto` and a URL it does not know, one more connection asks the server (bot.pooler)."""
        connect_kwargs: dict[str, Any] = {
            "timeout": connect_timeout,
            # application_name (naming the bot in pg_stat_activity) is one of the few startup
            # parameters PgBouncer passes on; the timeouts are set inside each transaction instead.
            "server_settings": {"application_name": application_name},
        }
        with _unavailable_on_failure("connect to the database"):
            pooled = transaction_pooler(dsn, pooler)
            if pooled is None:
                pooled = await _asks_the_server(dsn, connect_kwargs)
            if pooled:
                connect_kwargs.update(NO_STATEMENT_CACHE)
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                # Stale connections (a database restart, a failover) are replaced, not handed out.
                max_inactive_connection_lifetime=60.0,
                reset=_keep_session,
                **connect_kwargs,
            )
        return cls(
            pool,
            dsn=dsn,
            connect_kwargs=connect_kwargs,
            acquire_timeout=acquire_timeout,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
            metrics=metrics,
            cache_size=cache_size,
        )

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @property
    def metrics(self) -> Metrics | None:
        return self._metrics

    @property
    def acquire_timeout(self) -> float:
        return self._acquire_timeout

    @property
    def pooler_mode(self) -> bool:
        """No statement is cached on the server: DB_POOLER said so, or a pooler was found."""
        return self._pooler_mode

    async def run_again_if_pooler_broke(self, exc: BaseException) -> None:
        """Raise RunAgain when `exc` is a prepared statement broken by a transaction-mode pooler (then
        the pool is in pooler mode already: `_pooler_broke`)."""
        if await self._pooler_broke(exc):
            raise RunAgain("a pooler broke a prepared statement; now in pooler mode") from exc

    async def _pooler_broke(self, exc: BaseException) -> bool:
        """Whether `exc` is a prepared statement broken by a transaction-mode pooler that DB_POOLER did
        not name (or `auto` did not find). The first time, the pool switches to pooler mode: new
        connections keep no statement on the server, and the open ones are replaced as they come back
        (asyncpg's expiry). The failed statement never ran, so its work can be done again at once."""
        broken = broken_prepared_statement(exc)
        if broken is None:
            return False
        if not self._pooler_mode:
            self._pooler_mode = True
            self._connect_kwargs = {**self._connect_kwargs, **NO_STATEMENT_CACHE}
            self._pool.set_connect_args(self._dsn, **self._connect_kwargs)
            await self._pool.expire_connections()
            log.warning(
                "DATABASE_URL: prepared statements fail (%s: %s), as behind a pooler in transaction mode;"
                " switched to running without them: set DB_POOLER=transaction to start that way",
                type(broken).__name__,
                str(broken).partition("\n")[0],  # asyncpg adds a many-line hint
            )
        return True

    async def _on_pool(self, what: str, run: Callable[[], Awaitable[T]]) -> T:
        """Statements on any pooled connection, outside an update's transaction. One refused by a pooler
        for its prepared statement's name never ran: it is run once more, in pooler mode."""
        try:
            with _unavailable_on_failure(what):
                return await run()
        except StorageUnavailable as exc:
            if not await self._pooler_broke(exc):
                raise
        with _unavailable_on_failure(what):
            return await run()

    def contend(self, key: str) -> None:
        now = time.monotonic()
        if len(self._contended) > 1000:
            self._contended = {k: t for k, t in self._contended.items() if t > now}
        self._contended[key] = now + self.CONTENDED_FOR

    def contended(self, key: str) -> bool:
        until = self._contended.get(key)
        return until is not None and until > time.monotonic()

    def transaction(self) -> AbstractAsyncContextManager[_PostgresTransaction]:
        return _finished(
            _PostgresTransaction(
                self._pool, self._acquire_timeout, self._metrics, self._begin, self.cache.forget
            ),
            self,
        )

    def optimistic_transaction(self) -> AbstractAsyncContextManager[_OptimisticTransaction]:
        return _finished(_OptimisticTransaction(self), self)

    async def _execute(self, what: str, query: str, *args: Any) -> str:
        return await self._on_pool(
            what, lambda: self._pool.execute(query, *args, timeout=self._acquire_timeout * 2)
        )

    async def mark_sent(self, call_id: int) -> None:
        await self._execute(
            "mark reply sent",
            "UPDATE outbox SET sent_at = now(), attempts = attempts + 1, last_error = NULL, files = NULL"
            " WHERE id = $1",
            call_id,
        )

    async def call_files(self, call_id: int) -> tuple[Upload, ...]:
        packed = await self._on_pool(
            "read a reply's files",
            lambda: self._pool.fetchval(
                "SELECT files FROM outbox WHERE id = $1", call_id, timeout=self._acquire_timeout * 2
            ),
        )
        return unpack_uploads(packed)

    async def mark_failed(
        self, call_id: int, error: str, *, retry_in: float | None, now: float | None = None
    ) -> None:
        await self._execute(
            "mark reply failed",
            "UPDATE outbox SET attempts = attempts + 1, last_error = $2,"
            " failed_at = CASE WHEN $3::float8 IS NULL THEN now() END,"
            " files = CASE WHEN $3::float8 IS NULL THEN NULL ELSE files END,"
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
        rows = await self._on_pool(
            "claim due replies",
            lambda: self._pool.fetch(
                # heads: each chat's first unsent call, in one pass over the pending index (a
                # NOT EXISTS per row was quadratic when the planner misjudged a fresh backlog).
                "WITH t AS (SELECT to_timestamp(coalesce($3::float8, extract(epoch FROM now()))) AS now),"
                " heads AS (SELECT DISTINCT ON (chat_key) id FROM outbox"
                "  WHERE sent_at IS NULL AND failed_at IS NULL ORDER BY chat_key, id)"
                " UPDATE outbox SET lease_until = t.now + $2 * interval '1 second', lease_no = lease_no + 1"
                " FROM t WHERE id IN ("
                " SELECT o.id FROM outbox o, t WHERE o.sent_at IS NULL AND o.failed_at IS NULL"
                " AND o.lease_until <= t.now AND (o.chat_key IS NULL OR o.id IN (SELECT id FROM heads))"
                " ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED)"
                f" RETURNING {_CALL}",
                limit,
                lease,
                now,
                timeout=self._acquire_timeout * 2,
            ),
        )
        return _pending(rows)

    async def reserve_send(
        self, call: PendingCall, budgets: Sequence[Budget], now: float, lease: float
    ) -> Reservation:
        row = await self._on_pool(
            "reserve a send",
            lambda: self._pool.fetchrow(
                "SELECT * FROM reserve_send($1, $2, $3, $4::text[], $5::float8[], $6::float8[], $7, $8)",
                call.id,
                call.lease_no,
                call.chat,
                [b.key for b in budgets],
                [b.interval for b in budgets],
                [float(b.burst) for b in budgets],
                now,
                lease,
                timeout=self._acquire_timeout * 2,
            ),
        )
        assert row is not None
        return Reservation(row["verdict"], row["wait"] or 0.0, row["blocked_by"])

    async def pause_sends(self, chat: str | None, until: float, now: float, rule: FloodRule) -> bool:
        everything: bool = await self._on_pool(
            "pause sends",
            lambda: self._pool.fetchval(
                "SELECT pause_sends($1, $2, $3, $4, $5, $6, $7)",
                chat,
                until,
                now,
                rule.chats,
                rule.within,
                rule.rate,
                rule.pause_max,
                timeout=self._acquire_timeout * 2,
            ),
        )
        return everything

    async def move_chat(self, chat: str, to: int) -> int:
        # chat_key is generated from the payload: it follows.
        status = await self._execute(
            "move replies to a new chat",
            "UPDATE outbox SET payload = jsonb_set(payload, '{chat_id}', to_jsonb($2::bigint))"
            " WHERE chat_key = $1 AND sent_at IS NULL AND failed_at IS NULL",
            chat,
            to,
        )
        return int(status.rsplit(" ", 1)[-1])

    async def outbox_status(self, now: float) -> OutboxStatus:
        row = await self._on_pool(
            "read the outbox status",
            lambda: self._pool.fetchrow(
                "SELECT (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND failed_at IS NULL) AS unsent,"
                " (SELECT extract(epoch FROM min(created_at))::float8 FROM outbox"
                "  WHERE sent_at IS NULL AND failed_at IS NULL) AS oldest,"
                " (SELECT max(paused_until) FROM send_budget WHERE key = '*') AS paused_until,"
                " (SELECT count(*) FROM send_budget WHERE key <> '*' AND paused_until > $1) AS paused_chats",
                now,
                timeout=self._acquire_timeout * 2,
            ),
        )
        assert row is not None
        return OutboxStatus(
            unsent=row["unsent"],
            oldest_age=max(0.0, now - row["oldest"]) if row["oldest"] is not None else 0.0,
            paused_for=max(0.0, (row["paused_until"] or 0.0) - now),
            paused_chats=row["paused_chats"],
        )

    async def claim_due_timers(self, bot_id: int, limit: int, lease: float) -> list[DueTimer]:
        with _unavailable_on_failure("claim due timers"):
            rows = await self._pool.fetch(
                # heads: each key's earliest due timer. A head another process leased is skipped, and so
                # are the later timers of its key: they wait for it to be fired (deleted). The lease is
                # checked again on the row locked (a pick that committed since this statement's start).
                "WITH due AS (SELECT id, key, due_at, lease_until FROM timers"
                "  WHERE bot_id = $1 AND failed_at IS NULL AND due_at <= now() ORDER BY due_at, id LIMIT $4),"
                " heads AS (SELECT DISTINCT ON (key) id, lease_until FROM due ORDER BY key, due_at, id)"
                " UPDATE timers SET lease_until = now() + $3 * interval '1 second' WHERE id IN ("
                " SELECT t.id FROM timers t WHERE t.id IN (SELECT id FROM heads WHERE lease_until <= now())"
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
        rows = await self._on_pool(
            "list dead letters",
            lambda: self._pool.fetch(
                f"SELECT {_DEAD_LETTER} FROM dead_letters WHERE bot_id = $1 ORDER BY failed_at, update_id",
                bot_id,
                timeout=self._acquire_timeout * 2,
            ),
        )
        return [_dead_letter(row) for row in rows]

    async def ping(self) -> None:
        async def check() -> None:
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                try:
                    await check_migrated(conn)
                except NotMigrated as exc:
                    raise StorageUnavailable(str(exc)) from exc

        await self._on_pool("ping", check)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout=10)
        except TimeoutError:
            self._pool.terminate()

    # --- read-only looks for the playground: no locks taken, none waited for ---

    async def peek(self, key: str) -> SessionRow | None:
        """The committed row for display (the playground), read without a lock: never waits on, or
        holds up, an update. Lock placeholders (data IS NULL) are nobody's session."""
        row = await self._on_pool(
            f"peek at session {key!r}",
            lambda: self._pool.fetchrow(
                "SELECT key, data::text AS data, version, updated_at, expires_at FROM sessions"
                " WHERE key = $1 AND data IS NOT NULL",
                key,
                timeout=self._acquire_timeout * 2,
            ),
        )
        return None if row is None else SessionRow(**dict(row))

    async def latest_update_id(self, bot_id: int) -> int | None:
        """The highest update id recorded for the bot: the playground numbers its own updates above it."""
        latest: int | None = await self._on_pool(
            "read the latest update id",
            lambda: self._pool.fetchval(
                "SELECT max(update_id) FROM processed_updates WHERE bot_id = $1",
                bot_id,
                timeout=self._acquire_timeout * 2,
            ),
        )
        return latest

    async def queued_calls(self, bot_id: int, update_id: int) -> int:
        """How many Bot API calls the update queued: the replies `python -m bot chat` waits for."""
        count: int = await self._on_pool(
            "count queued calls",
            lambda: self._pool.fetchval(
                "SELECT count(*) FROM outbox WHERE bot_id = $1 AND update_id = $2",
                bot_id,
                update_id,
                timeout=self._acquire_timeout * 2,
            ),
        )
        return count
