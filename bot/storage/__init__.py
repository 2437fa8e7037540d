"""What a session storage must do, whatever keeps the data.

A storage hands out one transaction per update. Inside it, `read` locks the key until the transaction
ends, so two updates of one chat (in one process or in several) take turns instead of overwriting each
other's increments. The same transaction records the update as processed (`claim_update`), queues the
update's outgoing calls (`enqueue`) and schedules its timers (`schedule`), so the session write, the
exactly-once record, the replies and the timers commit or vanish together. A due timer is fired the same
way, in a transaction whose claim (`claim_timer`) deletes it.

An update whose handling fails for good is recorded instead, in the same kind of transaction as its
claim: a dead letter (`dead_letter`), listed by `dead_letters` and taken back by a replay
(`take_dead_letter`), whose transaction then applies it exactly once.

`docs/SESSIONS.md` describes the contract in prose; `bot.testing.conformance` checks an adapter against it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from ..errors import BotError, ControlFlow
from ..files import Upload
from ..send_budget import Budget, FloodRule

__all__ = [
    "Budget",
    "Conflict",
    "DeadLetter",
    "DueTimer",
    "FloodRule",
    "Moved",
    "OptimisticStorage",
    "OutboxStatus",
    "OutboxStore",
    "OutgoingCall",
    "PendingCall",
    "ReclaimingStorage",
    "Reservation",
    "RunAgain",
    "StaleRead",
    "Storage",
    "StorageRefused",
    "StorageUnavailable",
    "StoredSession",
    "TimerChange",
    "Transaction",
]


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A session as the storage keeps it: JSON text plus the version of the shape it was written in."""

    data: str
    version: int = 0


@dataclass(frozen=True, slots=True)
class Moved:
    """What `read` finds at a key whose session moved (a group upgraded to a supergroup): where it went."""

    key: str


@dataclass(frozen=True, slots=True)
class OutgoingCall:
    """A Bot API call a handler asked for; sent only after the update's transaction commits. Its files
    (read when it was queued) are named in `params` as "attach://<name>"."""

    method: str
    params: dict[str, Any]
    files: tuple[Upload, ...] = ()


@dataclass(frozen=True, slots=True)
class PendingCall:
    """An outbox row this process holds the lease on and should send now."""

    id: int
    method: str
    params: dict[str, Any]
    created_at: float  # epoch seconds, when the update's transaction queued it (the give-up clock)
    attempts: int = 0  # sends tried before this one
    # Which lease of the row this sender holds (each claim takes a new one): a sender whose lease ran out
    # and was taken by another finds out when it asks to send (`reserve_send`), and does not send.
    lease_no: int = 0
    # Whether it uploads files: the sender asks for them (`Storage.call_files`) right before sending, so
    # that a claim of many calls does not hold all their bytes at once.
    has_files: bool = False

    @property
    def chat(self) -> str | None:
        """The chat it goes to, as the outbox keys it (order and budgets are per chat)."""
        chat_id = self.params.get("chat_id")
        return None if chat_id is None else str(chat_id)


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer to reserve_send, which has already acted on it:

    - "go": send now; the slots are taken and the call's lease runs from now.
    - "wait": the call is due again in `wait` seconds, when the budget `blocked_by` allows it.
    - "behind": an earlier call to the same chat is unsent and goes first; this one is due as soon as it
      is its chat's first.
    - "lost": not this sender's to send any more: its lease ran out and another sender took the call, or
      the call was settled meanwhile.
    """

    verdict: Literal["go", "wait", "behind", "lost"]
    wait: float = 0.0
    blocked_by: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An update whose handling failed for good (docs/RELIABILITY.md), kept for `python -m bot replay`."""

    update_id: int
    body: str  # the update as received: the webhook's JSON body
    error: str  # one line: the exception's type and message
    traceback: str
    chat: str | None  # the chat id, when the update has a chat
    kind: str | None  # message, callback_query...; None for a kind the bot does not route
    attempts: int = 1  # deliveries (or replays) that failed
    failed_at: float = 0.0  # epoch seconds of the last failure; set by the storage when listing


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """What /metrics shows about the outbox, read at scrape time."""

    unsent: int
    oldest_age: float  # seconds since the oldest unsent call was queued; 0 when none
    paused_for: float  # seconds until a whole-bot 429 pause ends; 0 when none
    paused_chats: int


@dataclass(frozen=True, slots=True)
class TimerChange:
    """A timer a handler scheduled (`handler` set) or cancelled (`handler` None), applied on commit.

    `key` and `name` identify it: scheduling the same pair again replaces the timer. It is due at `at`
    (epoch seconds) or `after` seconds from the storage's clock at commit, whichever is given.
    `payload` is JSON for the handler; `origin` is the chat, sender and topic (a Bot API Message as
    JSON) the fire's sessions are keyed by and its replies go to."""

    key: str
    name: str
    handler: str | None = None
    payload: str = "null"
    origin: str = "{}"
    at: float | None = None
    after: float | None = None


@dataclass(frozen=True, slots=True)
class DueTimer:
    """A due timer, leased to the process that picked it to fire now."""

    id: int  # new with every (re)scheduling: claiming this id fires this version of the timer only
    key: str
    name: str
    handler: str
    payload: str
    origin: str
    due_at: float  # epoch seconds
    late: float  # seconds between due_at and when it was picked


class StorageUnavailable(BotError):
    """The database could not do its part (unreachable, lock or statement timeout, pool exhausted...).

    The update was not applied; the webhook answers 503 so that Telegram delivers it again.
    """


class RunAgain(StorageUnavailable):
    """Nothing of the update was applied, and what failed it is dealt with already (the storage changed
    how it talks to the database): run it again at once, once. Anywhere that does not, it is a
    StorageUnavailable like any other (503, Telegram delivers it again)."""


class StorageRefused(BotError):
    """The database refused a value this update tried to store: PostgreSQL's data exceptions (SQLSTATE
    class 22, e.g. jsonb refusing `\\u0000` in a string) and values over its limits (class 54).

    Deterministic: every delivery of the update would be refused the same way, so it is a dead letter
    (answered 200), not a 503. Nothing of the transaction was written.
    """


class Conflict(ControlFlow):
    """An optimistic attempt could not be applied as it ran: a session it read changed meanwhile, or the
    update turned out to be applied already. Nothing of it was written; run the update again in a
    locking transaction (`Storage.transaction()`), which also tells a redelivery apart.

    Control flow, not an Exception: it may be raised while an app's code runs (a lazy session loaded in
    a handler), and must reach the pipeline past the app's `except Exception` and error hook."""


class StaleRead(Conflict):
    """The session came from this process's memory of it (skipping the read) and had changed meanwhile
    (another process wrote it). The storage now remembers the current row, read in the same round trip:
    an optimistic retry costs one round trip again, and is the better next step than the lock."""


class Transaction(Protocol):
    async def claim_update(self, bot_id: int, update_id: int) -> bool:
        """Record the update as processed; False if it already was (a redelivery).

        A concurrent attempt at the same update waits here until the first one commits or rolls back.
        """

    def expect(self, keys: Sequence[str]) -> None:
        """A hint, before the first read: the keys of the update's sessions in this transaction, lazy ones
        included, which it may read. No I/O, no lock, and no promise that they are read; a storage may
        fetch them together with the first key it reads (the optimistic one does), or ignore it."""

    async def read(self, key: str) -> StoredSession | Moved | None:
        """Lock `key` for the rest of the transaction, even a key that has no session yet (the first two
        updates of a new chat must take turns too), and return its session (None: missing or expired),
        or where it moved to (see `move`)."""

    async def write(self, key: str, session: StoredSession, ttl: float | None = None) -> None:
        """Store the session, to read as missing `ttl` seconds from now when ttl is set."""

    async def delete(self, key: str) -> None: ...

    async def move(self, key: str, to: str, keep: float) -> None:
        """Replace the session at `key` with a forward to `to`: for `keep` seconds `read(key)` returns
        `Moved(to)`, then the key reads as missing. A later `write` or `delete` replaces the forward."""

    async def enqueue(
        self, bot_id: int, update_id: int, calls: Sequence[OutgoingCall], lease: float
    ) -> list[PendingCall]:
        """Queue calls for sending after commit, leased to the caller for `lease` seconds."""

    async def claim_unsent(self, bot_id: int, update_id: int, lease: float) -> list[PendingCall]:
        """Take over this update's calls that nobody confirmed and whose lease has run out."""

    async def dead_letter(self, bot_id: int, letter: DeadLetter) -> None:
        """Record the update as a dead letter, replacing any earlier letter of the same update id. Called
        after `claim_update` claimed it (or after `take_dead_letter` took it, for a replay that failed
        again), so it is recorded once."""

    async def take_dead_letter(self, bot_id: int, update_id: int) -> DeadLetter | None:
        """Remove the update's dead letter, locking it until the transaction ends: a replay's claim. None
        when there is none (never recorded, or replayed meanwhile). A concurrent take of the same update
        waits here until the first one commits or rolls back."""

    async def schedule(self, bot_id: int, changes: Sequence[TimerChange]) -> None:
        """Schedule, replace or cancel timers, in order, when the transaction commits."""

    async def claim_timer(self, bot_id: int, timer_id: int) -> bool:
        """The claim of a timer's fire: delete the timer on commit; False if it is gone (fired, replaced
        or cancelled meanwhile). A concurrent claim of the same timer waits here until this transaction
        commits or rolls back."""


class OutboxStore(Protocol):
    """The sender's side of the outbox: every storage call `bot.outbox.Outbox` makes, and nothing else.

    Times are epoch seconds from the sender's clock (`now`; None: the storage's own), so tests can drive
    the sender with a fake clock. The send budget's rule is `bot.send_budget`'s; `reserve_send` and
    `pause_sends` apply it atomically for every process sharing the storage."""

    async def mark_sent(self, call_id: int) -> None:
        """Record a confirmed send. The files of a call are dropped once it is sent or given up on."""

    async def call_files(self, call_id: int) -> tuple[Upload, ...]:
        """The files a queued call uploads, as they were read when it was queued."""

    async def mark_failed(
        self, call_id: int, error: str, *, retry_in: float | None, now: float | None = None
    ) -> None:
        """Record a failed send: retried after `retry_in` seconds, or never when retry_in is None."""

    async def defer(self, call_ids: Sequence[int], until: float) -> None:
        """Give the leases back without counting an attempt: the calls are due again at `until`."""

    async def claim_due(self, limit: int, lease: float, now: float | None = None) -> list[PendingCall]:
        """Lease unsent calls that are due (their lease ran out), oldest first, and only the first unsent
        call of each chat, so a chat's calls go out in the order they were queued."""

    async def reserve_send(
        self, call: PendingCall, budgets: Sequence[Budget], now: float, lease: float
    ) -> Reservation:
        """Right before sending `call`: take a slot in every budget, or in none of them (shared by every
        process using this storage), and renew the call's lease for `lease` seconds from `now`, if the
        sender still holds it. A call that may not go now is put back, due when it may (`Reservation`).
        The sends of the whole bot are counted here, for `pause_sends`' rule."""

    async def pause_sends(self, chat: str | None, until: float, now: float, rule: FloodRule) -> bool:
        """A 429 for a call to `chat`: no sends to it before `until`. When `rule` says the whole bot is
        over its limit, every send pauses too, until `until` but no longer than `rule.pause_max`; returns
        whether it did."""

    async def move_chat(self, chat: str, to: int) -> int:
        """A group became a supergroup (`to`): every unsent call to `chat` goes to `to` instead, in the
        order they were queued. Returns how many calls moved."""

    async def prune(self, keep_updates: float, keep_sent: float) -> int:
        """Forget processed update ids and sent (or abandoned) calls older than the given ages in seconds,
        and delete expired sessions, without waiting on rows locked at the moment. Returns how many rows
        it removed."""


class Storage(OutboxStore, Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """A unit of work: committed when the block exits normally, rolled back when it raises.

        No database work happens until the first method call, so updates that touch no session cost
        nothing.
        """

    async def outbox_status(self, now: float) -> OutboxStatus: ...

    async def claim_due_timers(self, bot_id: int, limit: int, lease: float) -> list[DueTimer]:
        """Lease up to `limit` due timers of the bot for `lease` seconds, earliest first: only timers
        nobody holds a lease on, and only the earliest of each key, so one key's timers fire one after
        the other, in order. The storage's own clock decides what is due."""

    async def fail_timer(self, timer_id: int, error: str) -> None:
        """The timer's handler failed: keep it, with the error, and never fire it again."""

    async def dead_letters(self, bot_id: int) -> list[DeadLetter]:
        """The bot's dead letters, oldest failure first."""

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the storage answers and is ready to serve."""

    async def close(self) -> None: ...


@runtime_checkable
class OptimisticStorage(Storage, Protocol):
    def optimistic_transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """Like `transaction()`, but `read` takes no lock and `claim_update` only records the wish: the
        claim, the writes and the queued calls are applied together at the end, if and only if no
        session read (however many keys) has changed and the update is new; otherwise the block raises
        Conflict and nothing is applied. The handlers may therefore run more than once (their calls are
        sent only after a commit).

        `read` may answer from what this process remembers of the key, unchecked until the end; when
        that turned out stale the block raises StaleRead, and a retry starts from the current row."""


@runtime_checkable
class ReclaimingStorage(Protocol):
    """A storage whose transactions hold what other updates wait for (a pooled connection, row locks)."""

    def reclaim(self, task: asyncio.Task[Any]) -> int:
        """Take back, from outside `task`, what its transactions hold: `task` is an update's attempt
        still running well past its deadline, ignoring its cancellation, and would otherwise hold it for
        as long as it runs. Each of its transactions is rolled back, and fails at its next use (a
        transient failure). Returns how many connections (or the like) were taken back."""
