"""One update, start to finish: route → claim → load (lock) → middleware and handlers → save → queue
replies → commit.

The replies come back to the caller to send after the commit (`bot.outbox`), so no Bot API call is
ever made while a session row is locked, and none is made for an update that was rolled back.

A failure costs only its update (`bot.failures`): a transient one raises TryLater (503, Telegram delivers
it again) until the update has failed too often for too long; a deterministic one (the bot's code, a
value that cannot be stored) rolls the update back, then claims it and records it as a dead letter in
one transaction, and it is acknowledged. `replay` runs a dead letter again once the code is fixed.

A due timer's fire (`fire`) runs the same way, its claim deleting the timer; a fire that fails for good
keeps its timer, marked failed with the error (the timers' own dead letter), never fired again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from .context import BotIdentity, Context, ImmediateApi, timer_context
from .dispatch import Bot, ErrorHook, NoSuchTimerHandler
from .errors import BotError
from .failures import TransientFailures, TryLater, dead_letter, describe, is_transient, storable
from .files import MAX_UPLOAD_BYTES
from .metrics import Metrics
from .router import Match
from .rules import ImplausibleMigration, chat_migration
from .session import AlreadyApplied, SessionConfig, SessionSlot
from .storage import (
    Conflict,
    DeadLetter,
    DueTimer,
    OptimisticStorage,
    PendingCall,
    RunAgain,
    StaleRead,
    Storage,
    TimerChange,
    Transaction,
)
from .telegram import BotApi, decode_update
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

# How long recording a dead letter may take once an update's own attempt has used up its deadline: the
# request deadline (REQUEST_DEADLINE, at most 55 s) plus this stays within Telegram's 60 s.
RECORD_WITHIN = 5.0


class Status(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # a redelivery: nothing applied again, unconfirmed replies sent again
    IGNORED = "ignored"  # no handler for this update: no database work at all
    FAILED = "failed"  # a handler raised and the error hook handled it: the hook's effects committed
    DEAD_LETTER = "dead_letter"  # failed for good: rolled back, recorded as a dead letter, acknowledged


# Outcomes after which a redelivery has nothing left to do: applied (or handled by the error hook), or
# recorded as a dead letter.
_DONE = frozenset((Status.APPLIED, Status.FAILED, Status.DEAD_LETTER))


@dataclass(frozen=True)
class Outcome:
    status: Status
    to_send: list[PendingCall] = field(default_factory=list)


class _Claim:
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


class _TimerClaim(_Claim):
    """A fire's claim deletes its timer (the stand-in update's id is the timer's, negated): a timer is
    fired when that commits, and another attempt finds it gone. Always taken, or it would fire again."""

    always = True

    async def _take(self) -> bool:
        return await self._tx.claim_timer(self._bot_id, -self._update_id)


class _Hooked(BotError):
    """The update failed after the error hook ran for it (the hook raised, or what it did could not be
    saved): `error` is what to record, and the hook is not run again."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


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
        deadline: float = 25.0,
        give_up: TransientFailures | None = None,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
    ) -> None:
        self.bot = bot
        self.storage = storage
        self.me = me
        self.metrics = metrics
        self.lease = lease
        self.api = ImmediateApi(api, api_timeout, max_upload_bytes)
        self.optimistic = optimistic and isinstance(storage, OptimisticStorage)
        self.deadline = deadline  # seconds for one delivery (REQUEST_DEADLINE)
        # When an update failing transiently again and again is recorded as a dead letter.
        self.give_up = give_up or TransientFailures(deliveries=5, seconds=300.0)
        self._running: dict[int, asyncio.Event] = {}  # update id -> set when its attempt here ends
        self._applied: dict[int, float] = {}  # ids done here with no calls queued -> when, oldest first
        # Told of the timers an update or a fire changed, once committed (the timer loop's wake-up).
        self.on_schedule: Callable[[Sequence[TimerChange]], None] | None = None

    async def process(self, update: Update) -> Outcome:
        """Apply the update exactly once, or record it as a dead letter. Raises TryLater when neither
        could be done now."""
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

    async def replay(self, letter: DeadLetter) -> Outcome:
        """Run a dead letter again (`python -m bot replay`), with locks: applied exactly once and removed
        from the dead letters in the same transaction, or, failing again, kept with one more attempt.
        DUPLICATE when it was replayed meanwhile. Raises TryLater as `process` does."""
        deadline = asyncio.get_running_loop().time() + self.deadline
        try:
            return await self._run(decode_update(letter.body.encode()), deadline, replay=True)
        except Exception as error:
            if is_transient(error):
                raise TryLater(self._why(error)) from error
            raise

    async def fire(self, timer: DueTimer) -> Outcome:
        """Run a due timer's handler exactly once, as an update's handlers run: in a transaction of its
        own, with the sessions of the chat and sender it was scheduled from, its replies queued in the
        outbox, and its claim deleting the timer, so that one fire commits, whichever process runs it and
        however often. No request deadline: this is where long work goes.

        A failure is classified as an update's is. Transient: TryLater, the timer stays (leased) and is
        fired again once its lease runs out, until it has failed so too often for too long (`give_up`).
        Deterministic: the error hook, as for an update; without one (or if the hook fails too) the fire
        is rolled back and the timer kept, marked failed with the error (DEAD_LETTER), never fired again."""
        started = time.perf_counter()
        outcome = "unavailable"
        try:
            result = await self._fire(timer)
            outcome = result.status.value
            return result
        finally:
            seconds = time.perf_counter() - started
            self.metrics.timer_done(outcome, seconds, timer.late)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "timer %d (%s): %s in %.1f ms, %.3f s late",
                    timer.id,
                    timer.handler,
                    outcome,
                    seconds * 1000,
                    timer.late,
                    extra={"timer": timer.id, "outcome": outcome, "duration": round(seconds, 6)},
                )

    async def _fire(self, timer: DueTimer) -> Outcome:
        try:
            handler = self.bot.timers.get(timer.handler)
            if handler is None:
                raise NoSuchTimerHandler(
                    f"no timer handler {timer.handler!r} (registered: {sorted(self.bot.timers)})"
                )
            outcome = await self._apply_in(
                timer_context(timer, self.me, self.api), [handler], optimistic=False, claim=_TimerClaim
            )
        except Exception as exc:
            error = exc.error if isinstance(exc, _Hooked) else exc
            line = describe(error)
            if is_transient(error):
                # Counted by the stand-in's id, the timer's negated: never an update's.
                failures = self.give_up.failed(-timer.id, time.monotonic())
                if failures is None:
                    raise TryLater(self._why(error)) from error
                seconds = time.monotonic() - failures.first
                line = f"gave up after {failures.count} transient failures in {seconds:.0f} s: {self._why(error)}"
            log.error(
                "timer %d (%s %r of key %r) failed and is kept as failed, never fired again: %s",
                timer.id,
                timer.handler,
                timer.name,
                timer.key,
                line,
                exc_info=error,
                extra={"timer": timer.id, "outcome": Status.DEAD_LETTER.value},
            )
            await self.storage.fail_timer(timer.id, storable(line))
            return Outcome(Status.DEAD_LETTER)
        self.give_up.succeeded(-timer.id)
        return outcome

    async def _process(self, update: Update) -> Outcome:
        """A redelivery of an update this process committed (applied, or recorded as a dead letter), and
        that queued no calls, is answered from memory: there is nothing to do or send again. One
        overlapping its first attempt here waits for it first, instead of racing it to the database."""
        update_id = update.update_id
        deadline = asyncio.get_running_loop().time() + self.deadline
        if update_id in self._running:
            try:
                async with asyncio.timeout_at(deadline):
                    while (running := self._running.get(update_id)) is not None:
                        await running.wait()
            except TimeoutError:
                raise TryLater(
                    f"an earlier delivery of it is still running after {self.deadline:g} s"
                ) from None
        applied = self._applied.get(update_id)
        if applied is not None and time.monotonic() - applied < KEEP_APPLIED_FOR:
            return Outcome(Status.DUPLICATE)
        done = self._running[update_id] = asyncio.Event()
        try:
            outcome = await self._attempt(update, deadline)
        finally:
            del self._running[update_id]
            done.set()
        if outcome.status in _DONE and not outcome.to_send:
            self._applied[update_id] = time.monotonic()
            if len(self._applied) > KEEP_APPLIED:
                del self._applied[next(iter(self._applied))]  # the oldest: dicts keep insertion order
        return outcome

    async def _attempt(self, update: Update, deadline: float) -> Outcome:
        """One delivery. A transient failure is Telegram's to retry, until the update has failed so too
        often for too long (`give_up`): then it is recorded as a dead letter, so that its chat moves on."""
        try:
            outcome = await self._run(update, deadline)
        except Exception as error:
            if not is_transient(error):
                raise
            failures = self.give_up.failed(update.update_id, time.monotonic())
            if failures is None:
                raise TryLater(self._why(error)) from error
            # The attempt may have used up the deadline: recording gets its own few seconds.
            seconds = time.monotonic() - failures.first
            line = f"gave up after {failures.count} transient failures in {seconds:.0f} s: {self._why(error)}"
            try:
                async with asyncio.timeout(RECORD_WITHIN):
                    return await self._record(update, error, hook=None, attempts=failures.count, line=line)
            except Exception as failure:
                if is_transient(failure):  # the database is still away: nothing recorded, 503 again
                    raise TryLater(f"{line}; and could not record it: {self._why(failure)}") from failure
                raise
        self.give_up.succeeded(update.update_id)
        return outcome

    async def _run(self, update: Update, deadline: float, *, replay: bool = False) -> Outcome:
        async with asyncio.timeout_at(deadline):
            try:
                return await self._route(update, replay=replay)
            except RunAgain:
                # Nothing of it was applied, and the storage dealt with the cause (a pooler found).
                return await self._route(update, replay=replay)

    def _why(self, error: BaseException) -> str:
        if isinstance(error, TimeoutError) and not str(error):
            return f"no result within {self.deadline:g} s"
        return describe(error)

    async def _route(self, update: Update, *, replay: bool = False) -> Outcome:
        """Route the update and apply it; a deterministic failure anywhere in it (a filter included) is
        rolled back and recorded as a dead letter. Transient failures are the caller's."""
        ctx: Context[Any] = Context(update, self.me, self.api)
        try:
            migration = chat_migration(update.message) if update.message is not None else None
        except ImplausibleMigration as exc:
            # Telegram never sends one; whoever did must not move or double a count. 200, logged.
            log.warning("update %d: chat migration ignored: %s", update.update_id, exc)
            migration, kind = None, None
        else:
            kind = update.kind
        hook = self.bot.error_hook
        try:
            # Filters are pure: an update no handler wants is known here, before any database work.
            found = await self.bot.match(ctx, kind) if kind is not None else []
            work: Callable[[], Awaitable[Outcome]] | None = None
            if migration is not None and any(c.merge is not None for c in self.bot.sessions.values()):
                work = partial(self._migrate, update, migration.old_chat_id, migration.new_chat_id, replay)
            elif found or replay:  # a replay takes its dead letter even if no handler wants it now
                work = partial(self._apply, ctx, found, replay)
            if work is None:
                return Outcome(Status.IGNORED)
            return await work()
        except _Hooked as hooked:
            error, hook = hooked.error, None
        except Exception as exc:
            if is_transient(exc):
                raise
            error = exc
        # One bad update must not wedge its chat: Telegram would redeliver it for 24 hours.
        try:
            return await self._record(update, error, hook=hook, replay=replay)
        except Exception as failure:
            if hook is None or is_transient(failure):
                raise
            # What the hook did could not be stored (a reply the database refuses): record without it.
            return await self._record(update, failure, hook=None, replay=replay)

    async def _record(
        self,
        update: Update,
        error: Exception,
        *,
        hook: ErrorHook | None,
        replay: bool = False,
        attempts: int = 1,
        line: str | None = None,
    ) -> Outcome:
        """Claim the failed update (for a replay: take its dead letter again), hand the error to the error
        hook, and record the update as a dead letter, in one transaction. A hook that returns normally
        handled the error: what it queued is sent, and nothing is recorded. Its context has no sessions:
        this runs after the attempt was rolled back (or for a failure before any was loaded)."""
        update_id = update.update_id
        async with self.storage.transaction() as tx:
            if replay:
                taken = await tx.take_dead_letter(self.me.id, update_id)
                if taken is None:
                    return Outcome(Status.DUPLICATE)  # replayed meanwhile
                attempts = taken.attempts + 1
            elif not await tx.claim_update(self.me.id, update_id):
                # Applied or recorded meanwhile, by a delivery that overlapped this one.
                return Outcome(Status.DUPLICATE, await tx.claim_unsent(self.me.id, update_id, self.lease))
            if hook is not None:
                ctx: Context[Any] = Context(update, self.me, self.api)
                try:
                    await hook(error, ctx)
                except Exception as failure:
                    if is_transient(failure):
                        raise
                    if failure is not error and failure.__context__ is None:
                        failure.__context__ = error  # the traceback shows what the hook was handling
                    error = failure
                else:
                    _handled(update, error)
                    if ctx.timers:
                        await tx.schedule(self.me.id, ctx.timers)
                    return Outcome(
                        Status.FAILED, await tx.enqueue(self.me.id, update_id, ctx.calls, self.lease)
                    )
            letter = dead_letter(update, error, attempts, line)
            await tx.dead_letter(self.me.id, letter)
        log.error(
            "update %d is a dead letter (attempt %d): %s; `python -m bot replay %d` runs it again once fixed",
            update_id,
            attempts,
            letter.error,
            update_id,
            extra={"update_id": update_id, "chat": letter.chat, "outcome": Status.DEAD_LETTER.value},
        )
        return Outcome(Status.DEAD_LETTER)

    @asynccontextmanager
    async def _unit(
        self, update: Update, *, optimistic: bool = False, replay: bool = False, claim: type[_Claim] = _Claim
    ) -> AsyncIterator[_Unit]:
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
            unit = _Unit(self.storage, main, claim(main, self.me.id, update.update_id, replay=replay))
            for config in self.bot.sessions.values():
                if config.storage is not None and id(config.storage) not in unit.transactions:
                    tx = await stack.enter_async_context(config.storage.transaction())
                    unit.transactions[id(config.storage)] = tx
            yield unit

    async def _apply(self, ctx: Context[Any], found: Match, replay: bool = False) -> Outcome:
        if self.optimistic and not replay:  # (a replay's claim is taking its dead letter: with locks)
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
        return await self._apply_in(ctx, found, optimistic=False, replay=replay)

    async def _apply_in(
        self,
        ctx: Context[Any],
        found: Match,
        *,
        optimistic: bool,
        replay: bool = False,
        claim: type[_Claim] = _Claim,
    ) -> Outcome:
        update = ctx.update
        status = Status.APPLIED if found else Status.IGNORED  # (ignored: a replay nothing wants now)
        hooked = False
        try:
            async with self._unit(update, optimistic=optimistic, replay=replay, claim=claim) as unit:
                slots = {
                    name: unit.slot(config, config.key(update)) for name, config in self.bot.sessions.items()
                }
                ctx.attach_sessions(slots)
                try:
                    try:
                        for slot in unit.in_lock_order(slots.values()):
                            if not slot.config.lazy:
                                await slot.load()
                        if found:  # (a replay's update that no handler wants now only takes its letter)
                            await self.bot.run(ctx, found)
                            if ctx.timers:
                                self._check_timers(ctx.timers)
                    except (AlreadyApplied, Conflict):  # the storage's business, not the bot's
                        raise
                    except Exception as error:
                        hook = self.bot.error_hook
                        if hook is None or is_transient(error):
                            raise
                        hooked = True
                        await self._on_error(hook, error, ctx, slots.values())
                        status = Status.FAILED
                    if ctx.calls or ctx.timers or replay or unit.claim.always:
                        # Replies and timers are exactly-once too, even from a handler with no session;
                        # and a replay always takes its dead letter, a fire its timer.
                        await unit.claim()
                except AlreadyApplied:
                    pass
                if unit.claim.duplicate:
                    # Checked here, not only in the except: a handler that swallowed AlreadyApplied must
                    # not get its changes saved.
                    return Outcome(
                        Status.DUPLICATE,
                        await unit.main.claim_unsent(self.me.id, update.update_id, self.lease),
                    )
                for slot in slots.values():
                    await slot.save()
                if ctx.timers:
                    await unit.main.schedule(self.me.id, ctx.timers)
                outcome = Outcome(
                    status, await unit.main.enqueue(self.me.id, update.update_id, ctx.calls, self.lease)
                )
        except Exception as failure:
            # After the hook ran, a failure (its own, or saving what it did) is recorded without it; a
            # conflict runs the update again (hook included: the optimistic attempt applied nothing).
            if hooked and not is_transient(failure) and not isinstance(failure, Conflict):
                raise _Hooked(failure) from failure
            raise
        if ctx.timers and self.on_schedule is not None:
            self.on_schedule(ctx.timers)
        return outcome

    def _check_timers(self, changes: Sequence[TimerChange]) -> None:
        """A timer for a handler that does not exist is the scheduling handler's mistake: it fails
        there, where the error hook and the log can name it, not when it would fire."""
        for change in changes:
            if change.handler is not None and change.handler not in self.bot.timers:
                raise NoSuchTimerHandler(
                    f"ctx.schedule({change.handler!r}): no such timer handler"
                    f" (register it with @bot.timer({change.handler!r}); registered: {sorted(self.bot.timers)})"
                )

    async def _on_error(
        self, hook: ErrorHook, error: Exception, ctx: Context[Any], slots: Iterable[SessionSlot[Any]]
    ) -> None:
        """Hand a handler's exception to the bot's error hook, on the state from before the handler: its
        session changes and queued calls are dropped, as a rollback would. The hook's own effects then
        commit with the update (claimed, so a redelivery does not run the hook again); if it raises, the
        update is rolled back and recorded as a dead letter."""
        for slot in slots:
            slot.discard_changes()
        ctx.calls.clear()
        ctx.timers.clear()
        await hook(error, ctx)
        _handled(ctx.update, error)

    async def _migrate(self, update: Update, old_chat: int, new_chat: int, replay: bool = False) -> Outcome:
        """Move each mergeable session from a group's old chat id to its new one, leaving a forward.

        Both of Telegram's service messages (one per chat, in either order, racing with other updates)
        get here; the first merges the old session into the new one and leaves a forward at the old key
        (so that a late update for the old id lands in the new chat too), the second finds the forward
        and has nothing left to do, so every increment lands in the new chat exactly once. Each pair is
        locked old key first, as an update following a forward does, so none of them can deadlock.
        """
        async with self._unit(update, replay=replay) as unit:
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


def _handled(update: Update, error: Exception) -> None:
    log.error(
        "update %d failed, and the error hook handled it: %s",
        update.update_id,
        describe(error),
        exc_info=error,
        extra={"update_id": update.update_id, "outcome": Status.FAILED.value},
    )


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
