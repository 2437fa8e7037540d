"""One update, start to finish: route → claim → load (lock) → middleware and handlers → save → queue
replies → commit.

The replies come back to the caller to send after the commit (`bot.outbox`), so no Bot API call is
ever made while a session row is locked, and none is made for an update that was rolled back.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from .context import BotIdentity, Context, ImmediateApi
from .dispatch import Bot, ErrorHook
from .metrics import Metrics
from .router import Match
from .rules import ImplausibleMigration, chat_migration
from .session import AlreadyApplied, SessionConfig, SessionSlot
from .storage import (
    Conflict,
    OptimisticStorage,
    PendingCall,
    RunAgain,
    StaleRead,
    Storage,
    StorageUnavailable,
    Transaction,
)
from .telegram import BotApi
from .types import Update

__all__ = ["Outcome", "Pipeline", "Status"]

log = logging.getLogger("bot.pipeline")

# How long a moved chat's old id keeps pointing at the new one: as long as processed update ids are
# kept, past Telegram's 24 h of redelivering an update.
KEEP_MOVES = 25 * 3600.0

# How many update ids applied without calls this process remembers, to answer their redeliveries with
# no database work (about 80 bytes each, 0.8 MB in all, measured with tracemalloc).
KEEP_APPLIED = 10_000
# ...and for how long: far less than the 25 h the database keeps them, and than the week after which
# Telegram may start numbering a bot's updates afresh.
KEEP_APPLIED_FOR = 3600.0


class Status(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # a redelivery: nothing applied again, unconfirmed replies sent again
    IGNORED = "ignored"  # no handler for this update: no database work at all
    FAILED = "failed"  # a handler raised: rolled back (or handed to the error hook), logged, acknowledged


@dataclass(frozen=True)
class Outcome:
    status: Status
    to_send: list[PendingCall] = field(default_factory=list)


class _Claim:
    """Records the update as processed, once, just before its transaction first reads or queues.

    Claiming lazily keeps updates that touch nothing out of `processed_updates`; claiming before any
    read makes a redelivery stop before its handler sees a session.
    """

    def __init__(self, tx: Transaction, bot_id: int, update_id: int) -> None:
        self._tx, self._bot_id, self._update_id = tx, bot_id, update_id
        self.done = False
        self.duplicate = False

    async def __call__(self) -> None:
        if not self.done:
            self.duplicate = not await self._tx.claim_update(self._bot_id, self._update_id)
            self.done = True
        if self.duplicate:
            raise AlreadyApplied(f"update {self._update_id} was applied before")


class Pipeline:
    def __init__(
        self,
        bot: Bot[Any],
        storage: Storage,
        me: BotIdentity,
        metrics: Metrics,
        *,
        lease: float = 30.0,
        api: BotApi | None = None,
        api_timeout: float = 5.0,
        optimistic: bool = False,
    ) -> None:
        self.bot = bot
        self.storage = storage
        self.me = me
        self.metrics = metrics
        self.lease = lease
        self.api = ImmediateApi(api, api_timeout)
        self.optimistic = optimistic and isinstance(storage, OptimisticStorage)
        self._running: dict[int, asyncio.Event] = {}  # update id -> set when its attempt here ends
        self._applied: dict[int, float] = {}  # ids applied here with no calls queued -> when, oldest first

    async def process(self, update: Update) -> Outcome:
        """Apply the update exactly once. Raises StorageUnavailable when it could not be applied now."""
        started = time.perf_counter()
        outcome = "unavailable"
        try:
            result = await self._process(update)
            outcome = result.status.value
            return result
        finally:
            seconds = time.perf_counter() - started
            self.metrics.update_done(update.kind or "other", outcome, seconds)
            if log.isEnabledFor(logging.INFO):
                chat = update.chat
                log.info(
                    "update %d: %s in %.1f ms",
                    update.update_id,
                    outcome,
                    seconds * 1000,
                    extra={
                        "update_id": update.update_id,
                        "chat": None if chat is None else chat.id,
                        "outcome": outcome,
                        "duration": round(seconds, 6),
                    },
                )

    async def _process(self, update: Update) -> Outcome:
        """A redelivery of an update this process applied, and that queued no calls, is answered from
        memory: it was committed, and there is nothing to send again. One overlapping its first attempt
        here waits for it first, instead of racing it to the database."""
        update_id = update.update_id
        while (running := self._running.get(update_id)) is not None:
            await running.wait()
        applied = self._applied.get(update_id)
        if applied is not None and time.monotonic() - applied < KEEP_APPLIED_FOR:
            return Outcome(Status.DUPLICATE)
        done = self._running[update_id] = asyncio.Event()
        try:
            try:
                outcome = await self._route(update)
            except RunAgain:
                # Nothing of it was applied, and the storage dealt with the cause (a pooler found).
                outcome = await self._route(update)
        finally:
            del self._running[update_id]
            done.set()
        if outcome.status is Status.APPLIED and not outcome.to_send:
            self._applied[update_id] = time.monotonic()
            if len(self._applied) > KEEP_APPLIED:
                del self._applied[next(iter(self._applied))]  # the oldest: dicts keep insertion order
        return outcome

    async def _route(self, update: Update) -> Outcome:
        ctx: Context[Any] = Context(update, self.me, self.api)
        try:
            migration = chat_migration(update.message) if update.message is not None else None
        except ImplausibleMigration as exc:
            # Telegram never sends one; whoever did must not move or double a count. 200, logged.
            log.warning("update %d: chat migration ignored: %s", update.update_id, exc)
            migration, kind = None, None
        else:
            kind = update.kind
        # Filters are pure: an update no handler wants is known here, before any database work.
        found = await self.bot.match(ctx, kind) if kind is not None else []
        work: Callable[[], Awaitable[Outcome]] | None = None
        if migration is not None and any(c.merge is not None for c in self.bot.sessions.values()):
            work = partial(self._migrate, update, migration.old_chat_id, migration.new_chat_id)
        elif found:
            work = partial(self._apply, ctx, found)
        if work is None:
            return Outcome(Status.IGNORED)
        try:
            return await work()
        except StorageUnavailable:
            raise
        except Exception:
            # One bad update must not wedge the chat's queue: Telegram would redeliver it forever.
            log.exception(
                "update %d: handler failed; rolled back and acknowledged",
                update.update_id,
                extra={"update_id": update.update_id, "outcome": "failed"},
            )
            return Outcome(Status.FAILED)

    @asynccontextmanager
    async def _unit(self, update: Update, *, optimistic: bool = False) -> AsyncIterator[_Unit]:
        """The update's transactions: on the bot's storage (the claim, the outbox, sessions without a
        storage of their own), plus one per other storage a session names.

        On exit the others commit first (the last opened first) and the bot's storage last, so a crash
        between the commits leaves the update unclaimed: its redelivery applies it again to the other
        storages (at least once there) and exactly once here. A failed commit rolls back those not yet
        committed; all of them roll back when anything raises before.
        """
        async with AsyncExitStack() as stack:
            if optimistic:
                # A cast, not an isinstance() check: that costs ~2% of a request on a runtime protocol.
                optimistic_storage = cast(OptimisticStorage, self.storage)
                main = await stack.enter_async_context(optimistic_storage.optimistic_transaction())
            else:
                main = await stack.enter_async_context(self.storage.transaction())
            unit = _Unit(self.storage, main, _Claim(main, self.me.id, update.update_id))
            for config in self.bot.sessions.values():
                if config.storage is not None and id(config.storage) not in unit.transactions:
                    tx = await stack.enter_async_context(config.storage.transaction())
                    unit.transactions[id(config.storage)] = tx
            yield unit

    async def _apply(self, ctx: Context[Any], found: Match) -> Outcome:
        if self.optimistic:
            for attempt in (1, 2):
                try:
                    return await self._apply_in(ctx, found, optimistic=True)
                except Conflict as conflict:
                    # Nothing of that attempt was applied or sent. A fresh context and match, so nothing
                    # the first run queued or set is left over; with locks the update is applied exactly
                    # once, or recognised as a redelivery. A stale remembered session is first retried
                    # once more without locks, from the current row that came back with the refusal.
                    self.metrics.optimistic_conflicts.inc()
                    ctx = Context(ctx.update, self.me, self.api)
                    found = await self.bot.match(ctx, kind) if (kind := ctx.update.kind) is not None else []
                    if attempt == 2 or not isinstance(conflict, StaleRead):
                        break
        return await self._apply_in(ctx, found, optimistic=False)

    async def _apply_in(self, ctx: Context[Any], found: Match, *, optimistic: bool) -> Outcome:
        update = ctx.update
        status = Status.APPLIED
        async with self._unit(update, optimistic=optimistic) as unit:
            slots = {
                name: unit.slot(config, config.key(update)) for name, config in self.bot.sessions.items()
            }
            ctx.attach_sessions(slots)
            try:
                try:
                    for slot in unit.in_lock_order(slots.values()):
                        if not slot.config.lazy:
                            await slot.load()
                    await self.bot.run(ctx, found)
                except (AlreadyApplied, StorageUnavailable, Conflict):  # not the handler's: no hook
                    raise
                except Exception as error:
                    hook = self.bot.error_hook
                    if hook is None:
                        raise
                    await self._on_error(hook, error, ctx, slots.values())
                    status = Status.FAILED
                if ctx.calls:
                    await unit.claim()  # replies are exactly-once too, even from a handler with no session
            except AlreadyApplied:
                pass
            if unit.claim.duplicate:
                # Checked here, not only in the except: a handler that swallowed AlreadyApplied must not
                # get its changes saved.
                return Outcome(
                    Status.DUPLICATE, await unit.main.claim_unsent(self.me.id, update.update_id, self.lease)
                )
            for slot in slots.values():
                await slot.save()
            return Outcome(
                status, await unit.main.enqueue(self.me.id, update.update_id, ctx.calls, self.lease)
            )

    async def _on_error(
        self, hook: ErrorHook, error: Exception, ctx: Context[Any], slots: Iterable[SessionSlot[Any]]
    ) -> None:
        """Hand a handler's exception to the bot's error hook, on the state from before the handler: its
        session changes and queued calls are dropped, as a rollback would. The hook's own effects then
        commit with the update (claimed, so a redelivery does not run the hook again)."""
        log.error(
            "update %d: handler failed; its changes are discarded and the error hook runs",
            ctx.update.update_id,
            exc_info=error,
        )
        for slot in slots:
            slot.discard_changes()
        ctx.calls.clear()
        await hook(error, ctx)

    async def _migrate(self, update: Update, old_chat: int, new_chat: int) -> Outcome:
        """Move each mergeable session from a group's old chat id to its new one, leaving a forward.

        Both of Telegram's service messages (one per chat, in either order, racing with other updates)
        get here; the first merges the old session into the new one and leaves a forward at the old key
        (so that a late update for the old id lands in the new chat too), the second finds the forward
        and has nothing left to do, so every increment lands in the new chat exactly once. Each pair is
        locked old key first, as an update following a forward does, so none of them can deadlock.
        """
        async with self._unit(update) as unit:
            pairs = [
                (
                    config,
                    unit.slot(config, config.prefix + str(old_chat)),
                    unit.slot(config, config.prefix + str(new_chat)),
                )
                for config in self.bot.sessions.values()
                if config.merge is not None
            ]
            try:
                for _, old, new in pairs:
                    await old.load()
                    await new.load()
            except AlreadyApplied:
                return Outcome(
                    Status.DUPLICATE, await unit.main.claim_unsent(self.me.id, update.update_id, self.lease)
                )
            for config, old, new in pairs:
                if old.key == new.key:
                    continue  # the old key already forwards here: the other message moved it
                assert config.merge is not None and old.key is not None and new.key is not None
                if old.stored:
                    new.set(config.merge(old.get(), new.get()))
                await new.save()
                await unit.transaction_of(config).move(old.key, new.key, KEEP_MOVES)
            log.info("update %d: moved sessions of chat %d to %d", update.update_id, old_chat, new_chat)
            return Outcome(Status.APPLIED)


class _Unit:
    def __init__(self, storage: Storage, main: Transaction, claim: _Claim) -> None:
        self.main = main
        self.claim = claim
        self._storage = storage
        # By storage identity, in the order opened: the bot's storage first.
        self.transactions: dict[int, Transaction] = {id(storage): main}

    def transaction_of(self, config: SessionConfig[Any]) -> Transaction:
        return self.transactions[id(config.storage or self._storage)]

    def slot(self, config: SessionConfig[Any], key: str | None) -> SessionSlot[Any]:
        return SessionSlot(config, key, self.transaction_of(config), self.claim)

    def in_lock_order(self, slots: Iterable[SessionSlot[Any]]) -> list[SessionSlot[Any]]:
        """The bot's storage first, then the others in the order their first session is declared; key by
        key within each. One order for every update, so two updates can't each hold a row the other
        waits for. (A lazy session is locked when first asked for, outside this order.)"""
        order = {storage_id: n for n, storage_id in enumerate(self.transactions)}
        return sorted(slots, key=lambda s: (order[id(s.config.storage or self._storage)], s.key or ""))
