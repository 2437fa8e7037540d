"""The outbox table's queries: queueing an update's calls (inside its transaction), and the sender's
side (`PostgresOutbox`, the `OutboxStore` the sender in bot/outbox.py calls): claiming due calls,
reserving a send in the shared budgets, recording the outcome, pausing on a 429, following a migrated
chat, and the status /metrics shows. The send budget's rule itself is bot/send_budget.py's; the SQL
functions `reserve_send` and `pause_sends` (migrations/005) execute it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import asyncpg

from ...files import Upload, pack_uploads, unpack_uploads
from .. import Budget, FloodRule, OutboxStatus, OutgoingCall, PendingCall, Reservation
from .pool import Pooled
from .statements import Args

__all__ = [
    "CALL_COLUMNS",
    "PostgresOutbox",
    "call_parameters",
    "pending_calls",
    "queue_calls",
    "queue_calls_text",
]

# What every query handing calls to a sender returns, for pending_calls(): whether a call has files, not
# the files (008).
CALL_COLUMNS = (
    "id, method, payload::text AS payload, attempts, extract(epoch FROM created_at)::float8 AS created_at,"
    " lease_no, files IS NOT NULL AS has_files"
)


def pending_calls(rows: Sequence[asyncpg.Record]) -> list[PendingCall]:
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


def queue_calls(
    arg: Args, bot_id: int, update_id: int, lease: float, calls: Sequence[OutgoingCall], where: str = ""
) -> str:
    """The INSERT that queues calls (leased to the caller), returning them as `pending_calls` reads
    them, its parameters added to `arg`."""
    values, files = call_parameters(bot_id, update_id, lease, calls)
    first = len(arg.values) + 1
    arg.values.extend(values)
    return queue_calls_text(first, files, where)


def call_parameters(
    bot_id: int, update_id: int, lease: float, calls: Sequence[OutgoingCall]
) -> tuple[list[Any], bool]:
    """`queue_calls_text`'s parameters, in its order, and whether they carry files: the bot, the update,
    the lease, the methods, the payloads, and the files only when a call has some: asyncpg looks the
    bytea[] type up on a connection's first use of it, a round trip that updates without files do not
    pay."""
    values: list[Any] = [
        bot_id,
        update_id,
        lease,
        [c.method for c in calls],
        [json.dumps(c.params) for c in calls],
    ]
    files = any(c.files for c in calls)
    if files:
        values.append([pack_uploads(c.files) for c in calls])
    return values, files


def queue_calls_text(first: int, files: bool, where: str = "") -> str:
    """The text of `queue_calls`, its parameters numbered from `first` (`call_parameters`). It depends
    on neither the number of calls nor their values, so a caller can keep it."""
    bot, update, lease, methods, payloads, packed = (f"${first + n}" for n in range(6))
    return (
        "INSERT INTO outbox (bot_id, update_id, method, payload, files, lease_until)"
        f" SELECT {bot}, {update}, c.method, c.payload::jsonb, {'c.files' if files else 'NULL::bytea'},"
        f" now() + {lease} * interval '1 second'"
        f" FROM unnest({methods}::text[], {payloads}::text[]{f', {packed}::bytea[]' if files else ''})"
        f" WITH ORDINALITY AS c(method, payload{', files' if files else ''}, n){where}"
        f" ORDER BY c.n RETURNING {CALL_COLUMNS}"
    )


class PostgresOutbox(Pooled):
    """The sender's side of the outbox, on any pooled connection."""

    async def mark_sent(self, call_id: int) -> None:
        await self._execute(
            "mark reply sent",
            "UPDATE outbox SET sent_at = now(), attempts = attempts + 1, last_error = NULL, files = NULL"
            " WHERE id = $1",
            call_id,
        )

    async def call_files(self, call_id: int) -> tuple[Upload, ...]:
        packed = await self._fetchval(
            "read a reply's files", "SELECT files FROM outbox WHERE id = $1", call_id
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
        rows = await self._fetch(
            "claim due replies",
            # heads: each chat's first unsent call, in one pass over the pending index (a NOT EXISTS
            # per row was quadratic when the planner misjudged a fresh backlog).
            "WITH t AS (SELECT to_timestamp(coalesce($3::float8, extract(epoch FROM now()))) AS now),"
            " heads AS (SELECT DISTINCT ON (chat_key) id FROM outbox"
            "  WHERE sent_at IS NULL AND failed_at IS NULL ORDER BY chat_key, id)"
            " UPDATE outbox SET lease_until = t.now + $2 * interval '1 second', lease_no = lease_no + 1"
            " FROM t WHERE id IN ("
            " SELECT o.id FROM outbox o, t WHERE o.sent_at IS NULL AND o.failed_at IS NULL"
            " AND o.lease_until <= t.now AND (o.chat_key IS NULL OR o.id IN (SELECT id FROM heads))"
            " ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED)"
            f" RETURNING {CALL_COLUMNS}",
            limit,
            lease,
            now,
        )
        return pending_calls(rows)

    async def reserve_send(
        self, call: PendingCall, budgets: Sequence[Budget], now: float, lease: float
    ) -> Reservation:
        row = await self._fetchrow(
            "reserve a send",
            "SELECT * FROM reserve_send($1, $2, $3, $4::text[], $5::float8[], $6::float8[], $7, $8)",
            call.id,
            call.lease_no,
            call.chat,
            [b.key for b in budgets],
            [b.interval for b in budgets],
            [float(b.burst) for b in budgets],
            now,
            lease,
        )
        assert row is not None
        return Reservation(row["verdict"], row["wait"] or 0.0, row["blocked_by"])

    async def pause_sends(self, chat: str | None, until: float, now: float, rule: FloodRule) -> bool:
        everything: bool = await self._fetchval(
            "pause sends",
            "SELECT pause_sends($1, $2, $3, $4, $5, $6, $7)",
            chat,
            until,
            now,
            rule.chats,
            rule.within,
            rule.rate,
            rule.pause_max,
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
        row = await self._fetchrow(
            "read the outbox status",
            "SELECT (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND failed_at IS NULL) AS unsent,"
            " (SELECT extract(epoch FROM min(created_at))::float8 FROM outbox"
            "  WHERE sent_at IS NULL AND failed_at IS NULL) AS oldest,"
            " (SELECT max(paused_until) FROM send_budget WHERE key = '*') AS paused_until,"
            " (SELECT count(*) FROM send_budget WHERE key <> '*' AND paused_until > $1) AS paused_chats",
            now,
        )
        assert row is not None
        return OutboxStatus(
            unsent=row["unsent"],
            oldest_age=max(0.0, now - row["oldest"]) if row["oldest"] is not None else 0.0,
            paused_for=max(0.0, (row["paused_until"] or 0.0) - now),
            paused_chats=row["paused_chats"],
        )
