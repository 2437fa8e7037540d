"""In-process storage for development and unit tests.

It keeps the same promises as PostgresStorage within one process: per-key locks held to the end of the
transaction, writes applied only on commit, and a redelivered update waiting for its first attempt.
State is lost when the process exits.

Timers are due by `clock` (the system's by default): a test hands in a clock it moves by hand, and
fires a five-minute timer without waiting five minutes. The send budgets are kept here and decided by
`bot.send_budget`'s functions, the rule PostgreSQL's `reserve_send` and `pause_sends` execute too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from .. import send_budget
from ..files import Upload
from ..outbox import Clock, SystemClock
from ..send_budget import WHOLE_BOT
from . import (
    Budget,
    DeadLetter,
    DueTimer,
    FloodRule,
    Moved,
    OutboxStatus,
    OutgoingCall,
    PendingCall,
    Reservation,
    StoredSession,
    TimerChange,
)

__all__ = ["MemoryStorage"]


@dataclass
class _Row:
    session: StoredSession
    expires_at: float | None
    moved_to: str | None = None  # a forward left by `move`; `session` is then empty


@dataclass
class _OutboxRow:
    id: int
    bot_id: int
    update_id: int
    method: str
    params: dict[str, Any]
    lease_until: float
    created_at: float
    sent_at: float | None = None
    failed_at: float | None = None
    last_error: str | None = None
    attempts: int = 0
    lease_no: int = 0
    files: tuple[Upload, ...] = ()

    @property
    def chat(self) -> str | None:
        chat_id = self.params.get("chat_id")
        return None if chat_id is None else str(chat_id)

    def pending(self) -> PendingCall:
        return PendingCall(
            self.id,
            self.method,
            self.params,
            self.created_at,
            self.attempts,
            self.lease_no,
            has_files=bool(self.files),
        )

    def lease(self, until: float) -> None:
        """A new lease (a new claim): whoever held the last one may no longer send it."""
        self.lease_until = until
        self.lease_no += 1


@dataclass
class _TimerRow:
    id: int
    bot_id: int
    change: TimerChange
    due_at: float
    lease_until: float = float("-inf")
    failed: str | None = None  # the error, once its handler failed

    def due(self, now: float) -> DueTimer:
        c = self.change
        assert c.handler is not None
        return DueTimer(
            self.id, c.key, c.name, c.handler, c.payload, c.origin, self.due_at, now - self.due_at
        )


@dataclass
class _Budget:
    next_at: float = 0.0
    paused_until: float = 0.0
    limited_at: float = 0.0  # the last 429 for this chat
    sends: float = 0.0  # the whole bot's send meter, as in PostgreSQL's send_budget (005)
    sends_at: float = 0.0

    def recent_sends(self, now: float) -> float:
        return send_budget.recent_sends(self.sends, self.sends_at, now)


class _KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._users: dict[Hashable, int] = {}

    async def acquire(self, key: Hashable) -> None:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            await lock.acquire()
        except BaseException:
            self._forget(key)
            raise

    def release(self, key: Hashable) -> None:
        self._locks[key].release()
        self._forget(key)

    def _forget(self, key: Hashable) -> None:
        self._users[key] -= 1
        if not self._users[key]:
            del self._users[key], self._locks[key]


class _MemoryTransaction:
    def __init__(self, storage: MemoryStorage) -> None:
        self._storage = storage
        self._held: list[Hashable] = []
        self._writes: dict[str, _Row | None] = {}
        self._claimed: list[tuple[int, int]] = []
        self._queued: list[_OutboxRow] = []
        self._leases: dict[int, float] = {}
        # (bot id, update id) -> the letter to record, or None to remove it; applied on commit.
        self._letters: dict[tuple[int, int], DeadLetter | None] = {}
        self._timer_changes: list[tuple[int, TimerChange]] = []
        self._fired: list[int] = []

    async def _lock(self, key: Hashable) -> None:
        if key not in self._held:
            await self._storage._locks.acquire(key)
            self._held.append(key)

    async def claim_update(self, bot_id: int, update_id: int) -> bool:
        await self._lock(("update", bot_id, update_id))
        if (bot_id, update_id) in self._storage._processed:
            return False
        self._claimed.append((bot_id, update_id))
        return True

    def expect(self, keys: Sequence[str]) -> None:
        pass  # every read is in memory: nothing to gain by reading ahead

    async def read(self, key: str) -> StoredSession | Moved | None:
        await self._lock(("session", key))
        row = self._writes[key] if key in self._writes else self._storage._sessions.get(key)
        if row is None or (row.expires_at is not None and row.expires_at <= time.time()):
            return None
        return row.session if row.moved_to is None else Moved(row.moved_to)

    async def write(self, key: str, session: StoredSession, ttl: float | None = None) -> None:
        await self._lock(("session", key))
        self._writes[key] = _Row(session, None if ttl is None else time.time() + ttl)

    async def delete(self, key: str) -> None:
        await self._lock(("session", key))
        self._writes[key] = None

    async def move(self, key: str, to: str, keep: float) -> None:
        await self._lock(("session", key))
        self._writes[key] = _Row(StoredSession(""), time.time() + keep, moved_to=to)

    async def enqueue(
        self, bot_id: int, update_id: int, calls: Sequence[OutgoingCall], lease: float
    ) -> list[PendingCall]:
        now = time.time()
        rows = [
            _OutboxRow(
                self._storage._next_id(),
                bot_id,
                update_id,
                c.method,
                c.params,
                now + lease,
                now,
                files=c.files,
            )
            for c in calls
        ]
        self._queued.extend(rows)
        return [r.pending() for r in rows]

    async def claim_unsent(self, bot_id: int, update_id: int, lease: float) -> list[PendingCall]:
        now = time.time()
        due = [
            row
            for row in self._storage._outbox.values()
            if (row.bot_id, row.update_id) == (bot_id, update_id) and _is_due(row, now)
        ]
        for row in due:
            self._leases[row.id] = now + lease
        return [replace(r.pending(), lease_no=r.lease_no + 1) for r in due]

    async def dead_letter(self, bot_id: int, letter: DeadLetter) -> None:
        await self._lock(("dead letter", bot_id, letter.update_id))
        self._letters[bot_id, letter.update_id] = letter

    async def take_dead_letter(self, bot_id: int, update_id: int) -> DeadLetter | None:
        ids = (bot_id, update_id)
        await self._lock(("dead letter", *ids))
        letter = self._letters[ids] if ids in self._letters else self._storage._dead_letters.get(ids)
        self._letters[ids] = None
        return letter

    async def schedule(self, bot_id: int, changes: Sequence[TimerChange]) -> None:
        self._timer_changes.extend((bot_id, change) for change in changes)

    async def claim_timer(self, bot_id: int, timer_id: int) -> bool:
        await self._lock(("timer", timer_id))
        row = self._storage._timers.get(timer_id)
        if row is None or row.failed is not None:
            return False
        self._fired.append(timer_id)
        return True

    def commit(self) -> None:
        storage = self._storage
        for key, row in self._writes.items():
            if row is None:
                storage._sessions.pop(key, None)
            else:
                storage._sessions[key] = row
        now = time.time()
        storage._processed.update((ids, now) for ids in self._claimed)
        storage._outbox.update((row.id, row) for row in self._queued)
        for call_id, lease_until in self._leases.items():
            storage._outbox[call_id].lease(lease_until)
        for ids, letter in self._letters.items():
            if letter is None:
                storage._dead_letters.pop(ids, None)
            else:
                storage._dead_letters[ids] = replace(letter, failed_at=now)
        for timer_id in self._fired:
            storage._drop_timer(timer_id)
        for bot_id, change in self._timer_changes:
            storage._change_timer(bot_id, change)

    def release(self) -> None:
        for key in reversed(self._held):
            self._storage._locks.release(key)
        self._held.clear()


def _unsent(row: _OutboxRow) -> bool:
    return row.sent_at is None and row.failed_at is None


def _is_due(row: _OutboxRow, now: float) -> bool:
    return _unsent(row) and row.lease_until <= now


@dataclass
class MemoryStorage:
    _sessions: dict[str, _Row] = field(default_factory=dict)
    _processed: dict[tuple[int, int], float] = field(default_factory=dict)
    _outbox: dict[int, _OutboxRow] = field(default_factory=dict)
    _budgets: dict[str, _Budget] = field(default_factory=dict)
    _dead_letters: dict[tuple[int, int], DeadLetter] = field(default_factory=dict)
    _locks: _KeyedLocks = field(default_factory=_KeyedLocks)
    _last_id: int = 0
    _timers: dict[int, _TimerRow] = field(default_factory=dict)
    _timer_ids: dict[tuple[int, str, str], int] = field(default_factory=dict)  # (bot, key, name) -> id
    clock: Clock = field(default_factory=SystemClock)

    def _next_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def _drop_timer(self, timer_id: int) -> None:
        row = self._timers.pop(timer_id, None)
        if row is not None:
            del self._timer_ids[row.bot_id, row.change.key, row.change.name]

    def _change_timer(self, bot_id: int, change: TimerChange) -> None:
        old = self._timer_ids.get((bot_id, change.key, change.name))
        if old is not None:
            self._drop_timer(old)
        if change.handler is None:
            return
        due_at = change.at if change.at is not None else self.clock.time() + (change.after or 0.0)
        row = _TimerRow(self._next_id(), bot_id, change, due_at)
        self._timers[row.id] = row
        self._timer_ids[bot_id, change.key, change.name] = row.id

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_MemoryTransaction]:
        tx = _MemoryTransaction(self)
        try:
            yield tx
            tx.commit()
        finally:
            tx.release()

    async def mark_sent(self, call_id: int) -> None:
        row = self._outbox[call_id]
        row.sent_at = time.time()
        row.attempts += 1
        row.files = ()

    async def call_files(self, call_id: int) -> tuple[Upload, ...]:
        return self._outbox[call_id].files

    async def mark_failed(
        self, call_id: int, error: str, *, retry_in: float | None, now: float | None = None
    ) -> None:
        row = self._outbox[call_id]
        row.last_error = error
        row.attempts += 1
        now = time.time() if now is None else now
        if retry_in is None:
            row.failed_at = now
            row.files = ()
        else:
            row.lease_until = now + retry_in

    async def defer(self, call_ids: Sequence[int], until: float) -> None:
        for call_id in call_ids:
            self._outbox[call_id].lease_until = until

    def _earlier_unsent(self, row: _OutboxRow) -> bool:
        return row.chat is not None and any(
            other.chat == row.chat and other.id < row.id and _unsent(other) for other in self._outbox.values()
        )

    async def claim_due(self, limit: int, lease: float, now: float | None = None) -> list[PendingCall]:
        now = time.time() if now is None else now
        due = [r for r in self._outbox.values() if _is_due(r, now) and not self._earlier_unsent(r)][:limit]
        for row in due:
            row.lease(now + lease)
        return [r.pending() for r in due]

    async def reserve_send(
        self, call: PendingCall, budgets: Sequence[Budget], now: float, lease: float
    ) -> Reservation:
        row = self._outbox.get(call.id)
        if row is None or row.lease_no != call.lease_no or not _unsent(row):
            return Reservation("lost")
        if self._earlier_unsent(row):
            row.lease_until = now
            return Reservation("behind")
        states = [self._budgets.setdefault(b.key, _Budget()) for b in budgets]
        wait, blocked_by = max(
            (send_budget.wait(b, s.next_at, s.paused_until, now), b.key)
            for s, b in zip(states, budgets, strict=True)
        )
        if wait > 0:
            row.lease_until = now + wait
            return Reservation("wait", wait, blocked_by)
        for state, budget in zip(states, budgets, strict=True):
            state.next_at = send_budget.next_at_after(budget, state.next_at, now)
            if budget.key == WHOLE_BOT:
                state.sends, state.sends_at = state.recent_sends(now) + 1, max(state.sends_at, now)
        row.lease_until = now + lease
        return Reservation("go")

    async def pause_sends(self, chat: str | None, until: float, now: float, rule: FloodRule) -> bool:
        if chat is not None:
            state = self._budgets.setdefault(chat, _Budget())
            state.paused_until = max(state.paused_until, until)
            state.limited_at = max(state.limited_at, now)
        limited = sum(
            1
            for k, b in self._budgets.items()
            if k != WHOLE_BOT and send_budget.limited_lately(rule, b.limited_at, now)
        )
        sending = self._budgets.get(WHOLE_BOT, _Budget()).recent_sends(now)
        everything = send_budget.whole_bot_limited(rule, limited, sending)
        if everything:
            state = self._budgets.setdefault(WHOLE_BOT, _Budget())
            state.paused_until = max(state.paused_until, send_budget.bot_paused_until(rule, until, now))
        return everything

    async def move_chat(self, chat: str, to: int) -> int:
        moving = [row for row in self._outbox.values() if row.chat == chat and _unsent(row)]
        for row in moving:
            row.params = {**row.params, "chat_id": to}
        return len(moving)

    async def outbox_status(self, now: float) -> OutboxStatus:
        unsent = [r for r in self._outbox.values() if _unsent(r)]
        whole = self._budgets.get(WHOLE_BOT, _Budget())
        return OutboxStatus(
            unsent=len(unsent),
            oldest_age=max(0.0, now - min(r.created_at for r in unsent)) if unsent else 0.0,
            paused_for=max(0.0, whole.paused_until - now),
            paused_chats=sum(1 for k, b in self._budgets.items() if k != WHOLE_BOT and b.paused_until > now),
        )

    async def claim_due_timers(self, bot_id: int, limit: int, lease: float) -> list[DueTimer]:
        now = self.clock.time()
        due = sorted(
            (r for r in self._timers.values() if r.bot_id == bot_id and r.failed is None and r.due_at <= now),
            key=lambda r: (r.due_at, r.id),
        )
        heads: dict[str, _TimerRow] = {}
        for row in due:
            heads.setdefault(row.change.key, row)  # a key's earliest goes first, the others after it
        taken = [r for r in heads.values() if r.lease_until <= now][:limit]
        for row in taken:
            row.lease_until = now + lease
        return [r.due(now) for r in taken]

    async def fail_timer(self, timer_id: int, error: str) -> None:
        row = self._timers.get(timer_id)
        if row is not None:
            row.failed = error

    async def prune(self, keep_updates: float, keep_sent: float) -> int:
        now = time.time()
        old_ids = [ids for ids, at in self._processed.items() if at < now - keep_updates]
        old_calls = [
            row.id for row in self._outbox.values() if (row.sent_at or row.failed_at or now) < now - keep_sent
        ]
        expired = [
            k for k, row in self._sessions.items() if row.expires_at is not None and row.expires_at <= now
        ]
        for ids in old_ids:
            del self._processed[ids]
        for call_id in old_calls:
            del self._outbox[call_id]
        for key in expired:
            del self._sessions[key]
        return len(old_ids) + len(old_calls) + len(expired)

    async def dead_letters(self, bot_id: int) -> list[DeadLetter]:
        mine = [letter for (bot, _), letter in self._dead_letters.items() if bot == bot_id]
        return sorted(mine, key=lambda letter: (letter.failed_at, letter.update_id))

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
