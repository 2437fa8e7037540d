"""The optimistic transaction: no lock held while the handlers run. It takes two round trips: read,
then one statement that applies the claim, the writes and the replies only if every row read is still
the version read (its `xmin`, with the server's start time: `optimistic_sql.revision`), else Conflict
and the pipeline runs the update again in a locking transaction. A row this process remembers
(`bot.storage.cache`: the session and its version as this process last read or wrote it) is not read,
and the same statement checks its version: one round trip in all when every session of the update is
remembered. The first read also reads ahead the rows of the update's other sessions that are not
remembered (`expect`), so that a new chat's and its sender's sessions cost one read: two round trips in
all. The reads and statements of several updates that reach them in the same turn of the event loop
go together, in one round trip and (statements) one commit (`bot.storage.postgres.batches`). It keeps
no state on the connection between transactions, so it works the same through PgBouncer in
transaction mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from .. import Conflict, DeadLetter, OutgoingCall, PendingCall, StaleRead, StoredSession, TimerChange
from ..cache import Cached, Contended, SessionCache, Turns
from .batches import ALONE, Batches
from .batches import LOCK_TIMEOUT as BATCH_LOCK_TIMEOUT
from .connections import Connections
from .optimistic_sql import CLAIM, NO_CLAIM, READ_SLOTS, TIMER, Shape, apply_text, read_text
from .outbox import call_parameters, pending_calls
from .statements import unavailable_on_failure

__all__ = ["OptimisticTransaction"]


@dataclass(slots=True)
class _Row:
    """A session row as an optimistic transaction read it: what it answered, the version the statement
    at the end checks, and what that statement writes."""

    session: StoredSession | None  # what read() answered (None: no session)
    revision: str | None  # the row's version when read (`optimistic_sql.revision`); None: there was no row
    cached: Cached | None = None  # read() answered from the SessionCache, with no round trip
    write: tuple[StoredSession, float | None] | None = None  # (session, ttl); None: delete, if `writes`
    # Whether the statement changes the row (deleting a row that was not there changes nothing): kept as
    # write() and delete() set it, not worked out each time it is asked (a frame, on every update).
    writes: bool = False


class OptimisticTransaction:
    """Two round trips and no lock held while the handlers run (see the module's docstring); one when
    this process remembers the session (`SessionCache`) and nobody else wrote it since.

    Any number of session rows (a chat's and a user's, say): each is read or remembered (no round trip),
    and the one statement at the end applies the claim and every write only if every row read is still
    the version it was read at (the claim: the update recorded as processed, or a fire's timer deleted).
    What it cannot do that way (a moved session, a redelivery, scheduling a timer, a dead letter) raises
    Conflict before anything is written, and the locking transaction takes over.

    The first read that goes to the database also reads ahead every other expected row (`expect`) not
    read, remembered (unless shared) or contended yet, in the same round trip. A row read ahead
    (`_ahead`) is only a value at hand: nothing checks or writes it until read() asks for it, which then
    takes the key's turn and answers it (unless an update of this process wrote it since, or the cache
    learnt something else of it: then what the cache has), and from then on it is checked like a row
    read then. A lazy session never asked for is never checked by this update, whoever writes it
    meanwhile. What was read is remembered for later updates (`_kept`), a row read ahead too, and so is
    a key with no row: its next update checks that there is still none (a row changed elsewhere since
    then costs that update a second run, StaleRead).

    Updates of one key take turns in this process (`Turns`), from the read to the end of the statement,
    so only another process can change a row under an attempt. Only the first key's turn is waited for.
    A transaction holding a turn that waited for another could wait forever: for an update taking the
    same two keys in the other order, or for one holding the second key's turn while it waits for the
    pooled connection this one holds. So when a later key's turn is another update's, the update gives
    up and runs with locks, which take rows in one order and wait for the database, bounded.
    """

    def __init__(
        self,
        connections: Connections,
        cache: SessionCache,
        turns: Turns,
        contended: Contended,
        shared: Contended,
        lock_timeout: str,
        batches: Batches | None = None,
    ) -> None:
        """`contended`: keys to run with locks for now; `shared`: keys to read afresh rather than take
        from `cache` for now. `lock_timeout`: DB_LOCK_TIMEOUT as a PostgreSQL setting's value ('5000ms'),
        for the statement."""
        self._connections = connections
        self._lock_timeout = lock_timeout
        self._batches = batches
        self._cache = cache  # what this process remembers of sessions, shared by its transactions
        self._turns = turns
        self._contended = contended
        # Keys another process wrote since this one remembered them: read afresh for a while (their
        # memory would be refused, and the handlers run twice, on nearly every update).
        self._shared = shared
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None
        self._claim: tuple[int, int] | None = None  # (bot, update id) to record as processed
        self._timer: tuple[int, int] | None = None  # (bot, timer id) of a fire, to delete
        self._rows: dict[str, _Row] = {}  # by key, in the order read
        self._expected: Sequence[str] = ()  # the update's session keys (`expect`): read ahead of need
        # Rows read ahead and not asked for yet: not checked by the statement, nor written, until read().
        # With `SessionCache.clock` then, and what the cache had of the key then (a shared key's memory).
        self._ahead: dict[str, tuple[asyncpg.Record, int, Cached | None]] = {}
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
            self._conn = await self._connections.take()
        return self._conn

    async def claim_update(self, bot_id: int, update_id: int) -> bool:
        self._claim = (bot_id, update_id)  # applied at the end, and only with the writes
        return True

    async def _wait_turn(self, key: str) -> None:
        """`key` is another update's turn: wait for it, unless this update holds one already."""
        if self._held:
            raise self._give_up(
                f"session {key!r} is another update's turn, and this one holds {self._held[0]!r}:"
                " run it with locks"
            )
        if self._turns.stuck(key) or not await self._turns.take(key):  # (stuck, maybe while waiting)
            raise self._give_up(
                f"session {key!r} is the turn of an update that has held it past any deadline:"
                " run it with locks"
            )

    def expect(self, keys: Sequence[str]) -> None:
        self._expected = keys

    async def read(self, key: str) -> StoredSession | None:
        if self._refusal is not None:
            raise self._refusal
        known = self._rows.get(key)
        if known is not None:  # read twice: the same answer, checked once at the end
            return known.session
        if self._contended.until and key in self._contended:  # (nearly always empty: no call then)
            raise self._give_up(f"session {key!r} is contended: run it with locks")
        if not self._turns.take_free(key):
            await self._wait_turn(key)
        self._held.append(key)
        ahead = self._ahead.pop(key, None)
        cached = self._cache.get(key)
        if (
            ahead is not None
            and not self._cache.written_since(key, ahead[1])
            and (cached is None or cached is ahead[2] or cached.revision == ahead[0]["revision"])
        ):
            # Read ahead by this update, no update of this process wrote it since, and nothing else was
            # remembered of it since (another update's refresh, or its newer read). A shared key is read
            # ahead over its memory: the row is newer than that, or the same.
            row = ahead[0]
        else:
            # (Read ahead, then written by another update of this process, or remembered anew: the row
            # is stale, and the statement would refuse it. What this process remembers is current.)
            # A key another process wrote lately is read afresh, unless a refresh was just learnt.
            if cached is not None and (cached.refreshed or not self._shared.until or key not in self._shared):
                # No round trip: the statement at the end checks the version, as it would after a read. A
                # redelivery is not told apart here but by its claim there (a conflict, then the lock).
                self._rows[key] = _Row(cached.session, cached.revision, cached)
                return cached.session
            row = await self._fetch(key)
        if row["moved_to"] is not None and not row["expired"]:
            raise self._give_up(f"session {key!r} moved: following it takes the locking transaction")
        session = self._kept(key, row)
        self._rows[key] = _Row(session, row["revision"])
        return session

    def _kept(self, key: str, row: asyncpg.Record) -> StoredSession | None:
        """The session in a row read (None: none), remembered for the next updates when it can be: one
        without an expiry, or no row at all (a new key, or a lazy session that stays at its initial
        value, which is never written: else each of its updates would read it again)."""
        session = None
        if row["data"] is not None and not row["expired"]:
            session = StoredSession(row["data"], row["version"])
        if row["revision"] is None:
            self._cache.put(key, None, None)
        elif session is not None and row["lasting"]:
            self._cache.put(key, session, row["revision"])
        return session

    async def _fetch(self, key: str) -> asyncpg.Record:
        """Read the row at `key`, and in the same round trip every expected key's that is neither read nor
        remembered yet, or shared (`_shared`: its memory is not used), nor contended (that one takes
        the lock), kept in `_ahead` for its read()."""
        rows, cache, contended = self._rows, self._cache, self._contended
        keys = [key]
        keys += (
            k
            for k in dict.fromkeys(self._expected)
            if k != key
            and k not in rows
            and k not in self._ahead
            and k not in contended
            and (k in self._shared or cache.get(k) is None)
        )
        # What is remembered of the shared keys read ahead, before the round trip (as `clock`): the others
        # were just found remembered as nothing, and the key asked for is answered, not kept ahead.
        remembered = {k: cache.get(k) for k in keys[1:] if k in self._shared}
        claim = self._claim if self._claim is not None and not self._asked_applied else None
        slots = -(-len(keys) // READ_SLOTS) * READ_SLOTS
        query = read_text(slots)
        values = [*keys, *(None,) * (slots - len(keys)), *(claim or (None, None))]
        clock = cache.clock  # (before the round trip: a write may land while it is under way)
        found: Any = ALONE
        if self._batches is not None and self._conn is None:
            # With the reads of other updates of this turn: a connection of the batch's, not one held
            # from here to the statement at the end. (One row per key, whatever is there.)
            found = await self._batches.fetch(query, values, len(keys))
        if found is ALONE:
            conn = await self._connection()
            with unavailable_on_failure(f"read session {key!r}"):
                found = await conn.fetch(query, *values)
        self._asked_applied = self._claim is not None
        if found[0]["done"]:  # (the outer join answers every key; `done` is the same in each answer)
            raise self._give_up("a redelivered update: the locking transaction tells it apart")
        turns = self._turns
        for row in found:
            other = row["key"]
            self._ahead[other] = (row, clock, remembered.get(other))
            if (
                other != key
                and not turns.busy(other)
                and not cache.written_since(other, clock)
                and other not in self._contended
                and cache.get(other) is None
            ):
                # Remembered too, as a row read is, for the updates after this one, which would read it
                # again otherwise (a session of this sender that this update does not use). Not while
                # another update of this process has the key's turn (it may be writing it), nor over
                # what was remembered during the round trip (it may be newer), nor for a key found
                # contended meanwhile (its memory was just forgotten as stale).
                self._kept(other, row)
        return self._ahead.pop(key)[0]

    async def write(self, key: str, session: StoredSession, ttl: float | None = None) -> None:
        row = self._rows.get(key)  # (no call around it: every session an update changes is written)
        if row is None:
            raise self._unread(key)
        row.write, row.writes = (session, ttl), True

    async def delete(self, key: str) -> None:
        row = self._rows.get(key)
        if row is None:
            raise self._unread(key)
        row.write, row.writes = None, row.revision is not None

    async def move(self, key: str, to: str, keep: float) -> None:
        raise self._give_up(f"moving session {key!r}: run it with locks")

    def _unread(self, key: str) -> Conflict:
        return self._give_up(f"session {key!r} written without being read: run it with locks")

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
        read = self._rows
        # The rows written, in key order, each with its place among the rows read.
        written = []
        for n, (key, row) in enumerate(read.items()):  # (not a generator: a frame per row resumed)
            if row.writes:
                written.append((key, n))
        written.sort()
        if self._claim is None and self._timer is None and not written and not calls:
            return []  # nothing to apply
        shape, values = self._statement(written, calls, bot_id, update_id, lease)
        rows: Any = ALONE
        if self._batches is not None and self._conn is None and self._claim is not None and not calls:
            # With the statements of other updates (`Batches`), unless it queues replies (each adds a row
            # to its answer) or claims nothing (the claim makes sending it again after a batch of unknown
            # outcome safe). An update that holds a connection (it read alone) sends it on that: given back,
            # it would queue for one again behind every newer update, one of which may be in a slow
            # handler, holding it (a 503 at the pool's wait limit, for this chat's trouble-free update).
            rows = await self._batches.fetch(apply_text(BATCH_LOCK_TIMEOUT, *shape), values)
        if rows is ALONE:
            rows = await self._alone(apply_text(self._lock_timeout, *shape), values)
        first = rows[0]
        if not first["applied"]:
            if all(first[f"u{n}"] for n in range(len(read))):
                assert self._timer is not None  # else every row unchanged means applied (or raised)
                raise self._give_up("the timer is gone (fired, replaced or cancelled): run it with locks")
            raise self._refused(list(read), first)
        cache = self._cache
        for n, (key, _) in enumerate(written):
            write = read[key].write
            if write is not None and write[1] is None:
                cache.wrote(key, write[0], first[f"r{n}"])  # remembered as written, at its new version
            else:
                cache.wrote(key)  # deleted, or expires: read it from the database
        for key, row in read.items():
            cached = row.cached
            if cached is not None and cached.refreshed and not row.writes and cache.get(key) is cached:
                # A refresh this attempt used and the statement found current: an ordinary memory now,
                # so a key read afresh for a while (`_shared`) is, rather than used again unchecked.
                # Only while it is still what the cache holds: the locking transaction takes no turn,
                # and its write of the key during the statement (after the statement's snapshot) made
                # the cache forget it; remembered again, that stale refresh would be refused later.
                cache.put(key, cached.session, cached.revision)
        return pending_calls(rows) if calls else []

    async def _alone(self, query: str, values: list[Any]) -> list[asyncpg.Record]:
        """The statement sent on this transaction's connection: its answer."""
        conn = await self._connection()
        with unavailable_on_failure("apply the update"):
            try:
                return await conn.fetch(query, *values)
            except (
                asyncpg.UniqueViolationError,
                asyncpg.DeadlockDetectedError,
                asyncpg.DivisionByZeroError,
            ) as exc:
                # The update's id was claimed meanwhile (a redelivery raced us), a locking attempt of it
                # holds what we need, or a row changed under a write: nothing of this statement was
                # applied. Other processes are writing these chats right now: the lock is the way.
                if not isinstance(exc, asyncpg.UniqueViolationError):
                    for key in self._rows:
                        self._cache.forget(key)
                        self._contended.add(key)
                raise self._give_up(f"apply the update: {type(exc).__name__}") from exc

    def _statement(
        self,
        written: list[tuple[str, int]],
        calls: Sequence[OutgoingCall],
        bot_id: int,
        update_id: int,
        lease: float,
    ) -> tuple[Shape, list[Any]]:
        """`_apply`'s statement: its shape (`apply_text` keeps a text per shape) and its parameters, in
        the order optimistic_sql's docstring lists them. `written`: the rows written, in key order,
        each with its place among the rows read."""
        rows = self._rows
        values: list[Any] = []
        shape = []
        for key, row in rows.items():
            values.append(key)
            there = row.revision is not None
            if there:
                values.append(row.revision)
            shape.append(there)
        claim = NO_CLAIM
        if self._claim is not None:
            claim = CLAIM
            values += self._claim
        elif self._timer is not None:
            claim = TIMER
            values += self._timer
        writes = []
        for key, n in written:
            write = rows[key].write
            writes.append((n, write is None))
            if write is not None:
                session, ttl = write
                values += (session.data, session.version, ttl)
        kind = 0
        if calls:
            parameters, files = call_parameters(bot_id, update_id, lease, calls)
            kind = 2 if files else 1
            values += parameters
        return (claim, tuple(shape), tuple(writes), kind), values

    def _refused(self, keys: list[str], found: asyncpg.Record) -> Conflict:
        """The statement applied nothing: rows among `keys` changed since they were read or remembered.
        A remembered one is refreshed from the row as it is now, which came back with the refusal: when
        every changed row was one of those, the next attempt (StaleRead) starts from them at no extra
        round trip. A row that changed after a fresh read, or right after a refresh, is being written by
        other processes as we speak, and taking turns on its row lock is cheaper than racing them. (An
        expired, moved or placeholder row is not remembered: it is read from the database.)"""
        changed, stale = [], True
        # A remembered row another process wrote since is refreshed, and its key read afresh for a while
        # (`_shared`): the next updates of a chat served by several processes read, rather than have
        # their memory refused and run their handlers twice.
        for n, key in enumerate(keys):
            if found[f"u{n}"]:
                continue
            changed.append(key)
            cached = self._rows[key].cached
            if cached is not None and not cached.refreshed:
                self._shared.add(key)
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
                await self._connections.give_back(conn)
