"""The optimistic transaction's SQL text (bot/storage/postgres/optimistic.py), pure: its read (of a row,
with the rows it reads ahead), and its one statement at the end, built from the update's shape alone
(how many rows, which were read or remembered, which are written and how, the claim, whether replies
are queued) and kept per shape, so an update passes only its parameters. Building the text was ~10% of
an update's CPU on workload T, and asyncpg caches the prepared statement by its text anyway.

The statement's parameters, in order (`apply_text`'s numbering; the transaction lists them the same way):
for each row (in the order read) its key, then its version when there was a row; the claim's two (the
bot and the update id, or the bot and the timer id of a fire); for each row written that is not deleted
(in key order) its data, its session version and its ttl; then the replies' (`call_parameters`).
"""

from __future__ import annotations

import functools

from .outbox import queue_calls_text
from .statements import session_columns
from .timers import CLAIM_TIMER

__all__ = ["CLAIM", "NO_CLAIM", "READ_SLOTS", "TIMER", "Shape", "apply_text", "read_text", "revision"]

NO_CLAIM, CLAIM, TIMER = 0, 1, 2  # what the statement claims: nothing, the update, a fire's timer

# apply_text's arguments after the lock timeout: the claim, the rows, the writes, the replies.
Shape = tuple[int, tuple[bool, ...], tuple[tuple[int, bool], ...], int]


def revision(table: str = "") -> str:
    """A row version as the optimistic transaction reads, remembers and checks it: the server's start
    time and the row's `xmin`.

    An xmin names one version of a row only while the server's history goes forward. After a restore,
    or a failover to a replica that lagged, transaction ids are handed out again from an earlier point:
    a remembered xmin can come back on another version of the row (the issue's 6 where the history says
    5). Each of those starts a server (or moves to another), so no revision from before one matches any
    after it. Computed in the statements themselves: no round trip, and it holds behind a pooler too,
    where a new server session is no new connection of ours, so that no connection hook would see it."""
    return f"extract(epoch FROM pg_postmaster_start_time())::text || ':' || {table}xmin::text"


READ_SLOTS = 4  # a read's keys take a multiple of this many places in its text, the rest NULL


@functools.cache
def read_text(slots: int) -> str:
    """The read of the rows at up to `slots` keys ($1…: the key asked for, then those read ahead with
    it, then NULLs), one answer per key, `key` naming it, each also saying whether the update (the next
    two parameters: the bot and its id; NULLs when that is not asked) was applied before.

    Each count of keys up to `slots` (a multiple of READ_SLOTS), asked or not, shares the text:
    `Batches` sends one text per batch, and with a text per count and per question the reads of one
    turn were split (the two-session bot's: a new chat's of its row and its sender's, a second sender's
    of its own in the handler), and a read left alone holds a connection that its update's statement is
    then sent on, alone too.

    The keys are a VALUES list of `slots` parameters, not an array, and each key's row is taken by a
    LATERAL subquery that OFFSET 0 keeps from being pulled up into a join. So the server plans for
    exactly `slots` keys, in its custom plans and in the generic one alike, and keeps the generic one
    after five runs rather than planning every run (~40 µs; for an array it guessed ten keys, and that
    plan looked dearer than one for the real two). And it looks each key up on its own, in the index
    when the table was never analyzed (a new deployment, every benchmark run) or analyzed with more
    than a few hundred rows: joined plainly, four keys on a small or never analyzed table made a hash
    join over a scan of every row, a plan kept as the table grew, each read reading every session (an
    array did so too: about half of the two-session bot's time in statements on workload T). (Analyzed
    with a few hundred rows or fewer, a key's lookup is a scan of the table, cheaper there; that plan
    too is kept as the table grows, until it is analyzed again: by default autovacuum does so once 50
    rows and a tenth of the table have changed.)"""
    values = ", ".join(f"(${n}::text)" for n in range(1, slots + 1))
    return (
        f"SELECT k.key, EXISTS (SELECT FROM processed_updates WHERE bot_id = ${slots + 1}"
        f" AND update_id = ${slots + 2}) AS done, s.* FROM (VALUES {values}) AS k (key)"
        f" LEFT JOIN LATERAL (SELECT {revision()} AS revision, moved_to, expires_at IS NULL AS lasting,"
        f" {session_columns()} FROM sessions WHERE key = k.key OFFSET 0) AS s ON true WHERE k.key IS NOT NULL"
    )


def _write(key: str, version: str | None, params: tuple[str, str, str] | None, after: str) -> str:
    """An optimistic write of the row at `key` (a parameter) that was read at `version` (an SQL check of
    it; None: there was no row), done only if `after` holds; it writes nothing when the row is another
    version by then. `params`: the data, session version and ttl parameters; None deletes the row."""
    if params is None:
        assert version is not None  # (deleting a row that was not there is no write)
        return f"DELETE FROM sessions WHERE key = {key} AND {version} AND {after}"
    data, session_version, ttl = params
    if version is None:
        return (
            "INSERT INTO sessions (key, data, version, expires_at, updated_at)"
            f" SELECT {key}, {data}::jsonb, {session_version},"
            f" now() + {ttl}::float8 * interval '1 second', now() WHERE {after}"
            " ON CONFLICT DO NOTHING"
        )
    return (
        f"UPDATE sessions SET data = {data}::jsonb, version = {session_version},"
        f" expires_at = now() + {ttl}::float8 * interval '1 second', updated_at = now(),"
        f" moved_to = NULL WHERE key = {key} AND {version} AND {after}"
    )


@functools.lru_cache(maxsize=1024)
def apply_text(
    lock_timeout: str,
    claim: int,
    rows: tuple[bool, ...],
    written: tuple[tuple[int, bool], ...],
    calls: int,
) -> str:
    """The statement that applies an optimistic update (see OptimisticTransaction._apply). `rows`: for
    each row in the order read, whether it was there;
    `written`: for each row written, in key order, (its index in `rows`, whether it is deleted); `calls`:
    0 without replies, 1 with, 2 with replies that carry files. `claim`: NO_CLAIM, CLAIM or TIMER.

    Its answer: `applied`; `u<n>`, whether row n is unchanged; `r<n>`, the new version of the n-th row
    written; `k<n>_…`, row n as it is now, when it changed; and one row per call queued.

    Whether a row was remembered or read is not part of the text, though only a remembered row's
    `k<n>_…` are used (a fresh read that changed is contended): one text for both, so that updates just
    after a read share a batch with those of remembered chats (`batches.py` sends one text at a time).
    The part costs nothing to a statement that applies."""
    count = 0

    def param() -> str:
        nonlocal count
        count += 1
        return f"${count}"

    # The parameters' numbers, in the module docstring's order.
    key_arg, version = [], {}
    for n, there in enumerate(rows):
        key_arg.append(param())
        if there:
            version[n] = f"{revision()} = {param()}"
    claimed = (param(), param()) if claim != NO_CLAIM else None
    write_params = [None if deleted else (param(), param(), param()) for _, deleted in written]

    checks = (
        f"EXISTS (SELECT FROM sessions WHERE key = {key_arg[n]} AND {version[n]})"
        if n in version
        else f"NOT EXISTS (SELECT FROM sessions WHERE key = {key_arg[n]})"
        for n in range(len(rows))
    )
    # DB_LOCK_TIMEOUT, set for this statement's own (implicit) transaction by the CTE every other part
    # waits for: a row or an update id held by someone else (a locking transaction, a `SELECT … FOR
    # UPDATE` in psql) ends it with LockNotAvailable after that long, as in the locking transaction,
    # instead of at the request's deadline. In the statement itself: no round trip, and no setting left
    # on a connection, which a transaction-mode pooler would not keep (nor take as a startup parameter).
    limit = f"set_config('lock_timeout', '{lock_timeout}', true) AS lock_timeout"
    ctes = [f"v AS (SELECT {', '.join([limit, *(f'{check} AS u{n}' for n, check in enumerate(checks))])})"]
    unchanged = " AND ".join(f"v.u{n}" for n in range(len(rows))) or "true"
    gate = None
    if claim == CLAIM:
        assert claimed is not None
        ctes.append(
            f"c AS (INSERT INTO processed_updates (bot_id, update_id) SELECT {claimed[0]},"
            f" {claimed[1]} FROM v WHERE {unchanged} RETURNING 1)"
        )
        gate = "c"
    elif claim == TIMER:
        assert claimed is not None
        # Gated on v even with no rows (`unchanged` is then true): v sets the lock timeout first.
        ctes.append(
            f"c AS ({CLAIM_TIMER.format(*claimed)} AND EXISTS (SELECT FROM v WHERE {unchanged}) RETURNING 1)"
        )
        gate = "c"
    elif rows:
        ctes.append(f"c AS (SELECT FROM v WHERE {unchanged})")
        gate = "c"
    for n, ((row, _), params) in enumerate(zip(written, write_params, strict=True)):
        assert gate is not None  # a row written was read, hence checked in c
        after = f"EXISTS (SELECT FROM {gate})"
        ctes.append(
            f"w{n} AS ({_write(key_arg[row], version.get(row), params, after)} RETURNING {revision()} AS revision)"
        )
        gate = f"w{n}"
    if calls:
        where = f" WHERE EXISTS (SELECT FROM {gate})" if gate else ""
        ctes.append(f"o AS ({queue_calls_text(count + 1, calls == 2, where)})")
    columns = [f"EXISTS (SELECT FROM {gate}) AS applied" if gate else "true AS applied"]
    joins = " FROM v"
    columns += [f"v.u{n}" for n in range(len(rows))]
    columns += [f"(SELECT revision FROM w{n}) AS r{n}" for n in range(len(written))]
    if written:
        # Checked, but a row changed between the statement's snapshot and its write (another process
        # committed in between): the chain of writes broke there, and a division by zero rolls the
        # whole statement back, so that neither the claim nor the other writes stay without it. (A
        # count, not a constant 1/0, which the planner would fold and raise every time.)
        columns.append(
            f"CASE WHEN EXISTS (SELECT FROM c) THEN 1 / (SELECT count(*)::int FROM w{len(written) - 1}) END AS torn"
        )
    for n in range(len(rows)):
        # Read in the statement's snapshot, before its own writes: the row as it is now, only when it
        # changed since read or remembered (`NOT v.u<n>`). OFFSET 0 keeps the planner from pulling the
        # subquery up into a join filter, so that the condition gates it as a one-time filter: an update
        # that applies reads no row here and turns no jsonb into text (EXPLAIN: "never executed").
        columns.append(
            f"k{n}.revision AS k{n}_revision, k{n}.data AS k{n}_data, k{n}.version AS k{n}_version"
        )
        joins += (
            f" LEFT JOIN LATERAL (SELECT {revision()} AS revision, data::text AS data, version"
            f" FROM sessions WHERE key = {key_arg[n]} AND moved_to IS NULL AND expires_at IS NULL"
            f" AND NOT v.u{n} OFFSET 0) AS k{n} ON true"
        )
    if calls:
        columns.append("o.id, o.method, o.payload, o.attempts, o.created_at, o.lease_no, o.has_files")
        joins += " LEFT JOIN o ON true"
    return f"WITH {', '.join(ctes)} SELECT {', '.join(columns)}{joins}"
