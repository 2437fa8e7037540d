"""One update's unit of work: its transaction on the bot's storage (the claim, the outbox, sessions
without a storage of their own), one more per other storage a session names, the claim taken lazily
in the bot's transaction (`Claim`; a timer's fire claims its timer: `TimerClaim`), and the one order
in which sessions are locked (`Unit.in_lock_order`). The pipeline opens one per attempt.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any

from .session import AlreadyApplied, SessionConfig, SessionSlot
from .storage import Storage, Transaction
from .storage.cache import Turns
from .types import Update

__all__ = ["Claim", "LockTurns", "TimerClaim", "Unit", "UnitOfWork"]


class Claim:
    """Records the update as processed, once, just before its transaction first reads or queues.

    Claiming lazily keeps updates that touch nothing out of `processed_updates`; claiming before any
    read makes a redelivery stop before its handler sees a session.
    """

    always = False  # claimed even when nothing was read or queued

    def __init__(self, tx: Transaction, bot_id: int, update_id: int, *, replay: bool = False) -> None:
        self._tx, self._bot_id, self._update_id = tx, bot_id, update_id
        self._replay = replay  # a replay's claim is taking its dead letter: the update id is claimed
        self.done = False
        self.duplicate = False

    async def _take(self) -> bool:
        if self._replay:
            return await self._tx.take_dead_letter(self._bot_id, self._update_id) is not None
        return await self._tx.claim_update(self._bot_id, self._update_id)

    async def __call__(self) -> None:
        if not self.done:
            self.duplicate = not await self._take()
            self.done = True
        if self.duplicate:
            raise AlreadyApplied(f"update {self._update_id} was applied before")


class TimerClaim(Claim):
    """A fire's claim deletes its timer (the stand-in update's id is the timer's, negated): a timer is
    fired when that commits, and another attempt finds it gone. Always taken, or it would fire again."""

    always = True

    async def _take(self) -> bool:
        return await self._tx.claim_timer(self._bot_id, -self._update_id)


class Unit:
    """One update's open transactions, the claim they share, and the order their sessions are locked in."""

    def __init__(self, storage: Storage, main: Transaction, claim: Claim) -> None:
        self.main = main
        self.claim = claim
        self._storage = storage
        # By storage identity, in the order opened: the bot's storage first.
        self.transactions: dict[int, Transaction] = {id(storage): main}

    def transaction_of(self, config: SessionConfig[Any]) -> Transaction:
        return self.transactions[id(config.storage or self._storage)]

    def slot(self, config: SessionConfig[Any], key: str | None) -> SessionSlot[Any]:
        return SessionSlot(config, key, self.transaction_of(config), self.claim)

    def slots(
        self, sessions: Mapping[str, SessionConfig[Any]], update: Update
    ) -> dict[str, SessionSlot[Any]]:
        """The update's slot of each session, by name. With two or more, each transaction is first told
        the keys of those it holds (`Transaction.expect`), lazy ones included, before the first read: a
        transaction may read them in one round trip. Optional for a storage: one written before the hint
        existed reads each key when asked, as it did.

        Loops rather than comprehensions, and no look-up of each session's transaction when there is one
        (nearly every bot): each is a frame, on every update with a handler."""
        slots: dict[str, SessionSlot[Any]] = {}
        main = self.main if len(self.transactions) == 1 else None
        keys: list[str] = []
        for name, config in sessions.items():
            key = config.key(update)
            slots[name] = SessionSlot(
                config, key, self.transaction_of(config) if main is None else main, self.claim
            )
            if key is not None:
                keys.append(key)
        if len(slots) > 1:
            if main is None:
                self._expect(slots.values())
            elif keys and (expect := getattr(main, "expect", None)) is not None:
                expect(keys)
        return slots

    def _expect(self, slots: Iterable[SessionSlot[Any]]) -> None:
        """`expect` with several transactions: each told the keys of its own sessions."""
        by_tx: dict[int, tuple[Transaction, list[str]]] = {}
        for slot in slots:
            if slot.key is not None:
                tx = self.transaction_of(slot.config)
                by_tx.setdefault(id(tx), (tx, []))[1].append(slot.key)
        for tx, found in by_tx.values():
            expect = getattr(tx, "expect", None)
            if expect is not None:
                expect(found)

    def in_lock_order(self, slots: Iterable[SessionSlot[Any]]) -> list[SessionSlot[Any]]:
        """The slots to load before the handlers, the lazy ones left out (each is locked when first asked
        for, outside this order): the bot's storage first, then the others in the order their first
        session is declared; key by key within each. One order for every update, so two updates can't
        each hold a row the other waits for."""
        eager = []
        for slot in slots:  # (not a comprehension: a frame, on every update)
            if not slot.config.lazy:
                eager.append(slot)
        if len(eager) < 2:
            return eager
        order = {storage_id: n for n, storage_id in enumerate(self.transactions)}
        return sorted(eager, key=lambda s: (order[id(s.config.storage or self._storage)], s.key or ""))


class UnitOfWork:
    """The update's transactions: `main` on the bot's `storage`, plus one per other storage a session
    names, opened in the order the sessions are declared.

    On exit the others commit first (the last opened first) and the bot's storage last, so a crash
    between the commits leaves the update unclaimed: its redelivery applies it again to the other
    storages (at least once there) and exactly once here. A failed commit rolls back those not yet
    committed; all of them roll back when anything raises before.

    A class rather than an @asynccontextmanager over an AsyncExitStack, which cost ~3% of an update's
    CPU on workload T: with every session in the bot's storage (nearly every bot), `main` is entered
    and left directly, and the stack is used only when there are other storages.
    """

    def __init__(
        self,
        storage: Storage,
        main: AbstractAsyncContextManager[Transaction],
        sessions: Iterable[SessionConfig[Any]],
        claim: Callable[[Transaction], Claim],
    ) -> None:
        self._storage = storage
        self._main = main
        self._others = [c.storage for c in sessions if c.storage is not None and c.storage is not storage]
        self._claim = claim
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> Unit:
        if not self._others:
            tx = await self._main.__aenter__()
            return Unit(self._storage, tx, self._claim(tx))
        async with AsyncExitStack() as stack:
            tx = await stack.enter_async_context(self._main)
            unit = Unit(self._storage, tx, self._claim(tx))
            for other in self._others:
                if id(other) not in unit.transactions:
                    unit.transactions[id(other)] = await stack.enter_async_context(other.transaction())
            self._stack = stack.pop_all()  # opened: left in __aexit__
        return unit

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if self._stack is None:
            return await self._main.__aexit__(kind, exc, tb)
        return await self._stack.__aexit__(kind, exc, tb)


class LockTurns:
    """Attempts with locks take turns per session key in this process before their transaction takes a
    connection: two of a key's updates at a time hold a pooled connection for its row (one with the
    row's lock, the next waiting on it in the database, which hands the lock over at the commit without
    a round trip to us), the others wait here, holding none. Without this each of a hot chat's
    concurrent updates took a connection and waited on the chat's row with it, and a slow handler there
    (a `ctx.api` call) left none to other chats: a 503 after DB_ACQUIRE_TIMEOUT for every chat. With
    one turn per key, each update of a hot chat waited for the one before it to answer before starting
    its own round trips: workload B with DB_CONCURRENCY=locked lost a quarter of its rate
    (bench/README.md). A key whose turns are all held past TURN_STUCK_AFTER (attempts that ignored
    their deadline, or timer fires doing long work) is not waited for, and those waiting for it then
    stop. (Such an attempt's connection, and the row lock of its transaction, were taken back before:
    `bot.overdue`.)"""

    HOLDERS = 2

    def __init__(self) -> None:
        self.turns = Turns(holders=self.HOLDERS)

    @asynccontextmanager
    async def hold(self, keys: Iterable[str]) -> AsyncIterator[None]:
        taken: list[str] = []
        try:
            for key in sorted(set(keys)):  # one order for every attempt: none waits for another's
                if not self.turns.take_free(key) and (
                    self.turns.stuck(key) or not await self.turns.take(key)
                ):
                    continue  # stuck, or became stuck while this waited (not taken: not given back)
                taken.append(key)
            yield
        finally:
            for key in taken:
                self.turns.give_back(key)
