"""The locking transaction: one update on one pooled connection, its session rows locked from read to
commit, in three round trips when it changes a session and sends nothing (an increment), four when it
queues replies:

    BEGIN; SET LOCAL lock_timeout ...; INSERT processed_updates ...  -- 1: one message: the timeouts
                                              --    live in the transaction; claim (a redelivery waits here)
    INSERT sessions ... ON CONFLICT DO UPDATE -- 2: lock the session row, created if missing, and read it
    ... handlers run ...
    [INSERT outbox ... RETURNING]             -- (3: the replies, leased to this process, with the writes)
    INSERT sessions ... ; COMMIT              -- 3: the writes and the commit (then replies are sent)

Lock order inside a transaction is: the update id's unique index entry, then session rows in the order
the session layer reads them (sorted, when it needs several). The only waits are on those, bounded by
`lock_timeout`. It keeps no state on the connection between transactions, so it works the same through
PgBouncer in transaction mode. Redeliveries, replays, dead letters, scheduling timers and chat moves
all run here, and so does a timer's fire whose optimistic attempt was refused.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from ...metrics import Metrics
from .. import DeadLetter, Moved, OutgoingCall, PendingCall, StoredSession, TimerChange
from .connections import Connections
from .maintenance import DEAD_LETTER_COLUMNS, dead_letter_of
from .outbox import CALL_COLUMNS, pending_calls, queue_calls
from .statements import Args, session_columns, unavailable_on_failure
from .timers import CANCEL_TIMER, CLAIM_TIMER, SCHEDULE_TIMER

__all__ = ["PostgresTransaction"]


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

# The first statement of a transaction (riding with its BEGIN), or after its writes.
_CLAIM_UPDATE = "INSERT INTO processed_updates (bot_id, update_id) VALUES ({}, {}) ON CONFLICT DO NOTHING"


class PostgresTransaction:
    """Begins on first use: an update that touches no session never takes a connection.

    Writes wait in `_writes` until the next statement, so they ride with the replies or the COMMIT
    instead of costing a round trip each (measured: 5 to 6 round trips per update before, 3 now).
    """

    def __init__(
        self,
        connections: Connections,
        metrics: Metrics | None,
        begin: str,
        wrote: Callable[[str], None],
    ) -> None:
        self._connections = connections
        self._wrote = wrote  # what the optimistic transactions remember of a key it writes is stale
        self._metrics = metrics  # for the lock-wait histogram
        self._begin = begin
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None
        self._begun = False
        # key -> (session, ttl) to store, or None to delete; applied in this order before anything else.
        self._writes: dict[str, tuple[StoredSession, float | None] | None] = {}
        # Rows this transaction inserted only to have something to lock; removed before commit unless
        # written, so "no session" stays "no row".
        self._placeholders: set[str] = set()
        # Keys written (or moved): told to the cache again once the commit is over, since an optimistic
        # read during the commit's round trip may have seen (and remembered) the row before it.
        self._written: set[str] = set()
        # Timers to schedule or cancel, riding with the writes: by (bot, key, name), the last change
        # only, since one statement's parts do not see each other's rows.
        self._timers: dict[tuple[int, str, str], TimerChange] = {}

    async def _connection(self, begin: bool = True) -> asyncpg.pool.PoolConnectionProxy:
        if self._conn is None:
            self._conn = await self._connections.take()
        if begin and not self._begun:
            with unavailable_on_failure("begin"):
                await self._conn.execute(self._begin)
            self._begun = True
        return self._conn

    def _take_writes(self, value: Callable[[Any], str]) -> list[str]:
        """The pending writes as statements, each value turned into SQL by `value` (a parameter of one
        statement being assembled, or a literal), and forget them. Raises (a NUL in a literal) before
        forgetting anything."""
        statements = []
        for key, write in self._writes.items():
            self._wrote(key)
            self._written.add(key)
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
                statements.append(CANCEL_TIMER.format(**where))
            else:
                statements.append(
                    SCHEDULE_TIMER.format(
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

    def _writes_as_ctes(self, arg: Args) -> str:
        """The pending writes as data-modifying CTEs (`WITH …, ` or nothing), to ride with a statement."""
        ctes = [f"w{n} AS ({sql})" for n, sql in enumerate(self._take_writes(arg))]
        return f"WITH {', '.join(ctes)} " if ctes else ""

    async def _flush(self) -> None:
        if self._writes or self._timers:
            conn = await self._connection()
            arg = Args()
            with unavailable_on_failure("write sessions"):
                # One statement for all of them: its parameters are numbered across every write.
                await conn.execute(self._writes_as_ctes(arg) + "SELECT", *arg.values)

    async def claim_update(self, bot_id: int, update_id: int) -> bool:
        return await self._claim(_CLAIM_UPDATE, "claim update", bot_id, update_id) == "INSERT 0 1"

    async def claim_timer(self, bot_id: int, timer_id: int) -> bool:
        # The row stays locked to the end: a second process firing the same timer waits here, and finds
        # it gone once this one commits.
        return await self._claim(CLAIM_TIMER, "claim timer", bot_id, timer_id) == "DELETE 1"

    async def _claim(self, claim: str, what: str, bot_id: int, unit_id: int) -> str:
        conn = await self._connection(begin=False)
        with unavailable_on_failure(what):
            if self._begun:
                await self._flush()
                status: str = await conn.execute(claim.format("$1", "$2"), bot_id, unit_id)
            else:
                # BEGIN (and its SET LOCALs) ride with the claim as one simple query (ints only: safe literals).
                status = await conn.execute(self._begin + "; " + claim.format(int(bot_id), int(unit_id)))
                self._begun = True
        return status

    def expect(self, keys: Sequence[str]) -> None:
        pass  # each read locks its row: reading a lazy session's ahead would lock it for nothing

    async def read(self, key: str) -> StoredSession | Moved | None:
        await self._flush()
        conn = await self._connection()
        with unavailable_on_failure(f"read session {key!r}"):
            # A missing row cannot be locked, so the first two updates of a new chat would both see
            # "nothing" and both insert. The upsert locks the row in one statement whether it exists or
            # not: a placeholder (data NULL) is inserted for a new key, and the loser of that INSERT race
            # waits for the winner's commit, then locks the winner's row and reads its newest data.
            # moved_to rides along: a chat that moved costs no extra query to find out (002).
            started = time.perf_counter()
            row = await conn.fetchrow(
                "INSERT INTO sessions (key) VALUES ($1) ON CONFLICT (key) DO UPDATE SET key = EXCLUDED.key"
                f" RETURNING {session_columns()}, moved_to",
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
        self._wrote(key)
        self._written.add(key)
        conn = await self._connection()
        with unavailable_on_failure(f"move session {key!r}"):
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
        arg = Args()
        # The writes ride along as data-modifying CTEs: one round trip for both.
        writes = self._writes_as_ctes(arg)
        insert = queue_calls(arg, bot_id, update_id, lease, calls)
        with unavailable_on_failure("queue replies"):
            rows = await conn.fetch(writes + insert, *arg.values)
        return pending_calls(rows)

    async def schedule(self, bot_id: int, changes: Sequence[TimerChange]) -> None:
        for change in changes:
            self._timers.pop((bot_id, change.key, change.name), None)  # keeps the order of the last one
            self._timers[bot_id, change.key, change.name] = change

    async def claim_unsent(self, bot_id: int, update_id: int, lease: float) -> list[PendingCall]:
        await self._flush()
        conn = await self._connection()
        with unavailable_on_failure("claim unsent replies"):
            rows = await conn.fetch(
                "UPDATE outbox SET lease_until = now() + $3 * interval '1 second', lease_no = lease_no + 1"
                " WHERE bot_id = $1 AND update_id = $2 AND sent_at IS NULL AND failed_at IS NULL"
                f" AND lease_until <= now() RETURNING {CALL_COLUMNS}",
                bot_id,
                update_id,
                lease,
            )
        return pending_calls(rows)

    async def dead_letter(self, bot_id: int, letter: DeadLetter) -> None:
        await self._flush()
        conn = await self._connection()
        with unavailable_on_failure("record a dead letter"):
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
        with unavailable_on_failure("take a dead letter"):
            # The delete locks the row: a second replay waits here, then finds it gone.
            row = await conn.fetchrow(
                f"DELETE FROM dead_letters WHERE bot_id = $1 AND update_id = $2 RETURNING {DEAD_LETTER_COLUMNS}",
                bot_id,
                update_id,
            )
        return None if row is None else dead_letter_of(row)

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
                with unavailable_on_failure("commit"):
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
            for key in self._written:
                self._wrote(key)
            self._written.clear()
            held, self._conn = self._conn, None
            if held is not None:
                await self._connections.give_back(held)
