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

The run reads top to bottom here; its parts with a job of their own are beside it: `bot.redelivery`
(redeliveries answered from this process's memory), `bot.unit` (one attempt's transactions, its claim
and lock order), `bot.recording` (claiming and recording an update that failed for good) and
`bot.outcome` (what became of an update).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any

from .context import BotIdentity, Context, ImmediateApi, timer_context
from .deadline import Deadlines
from .dispatch import Bot, ErrorHook, NoSuchTimerHandler
from .errors import BotError
from .failures import TransientFailures, TryLater, as_failure, describe, is_transient, storable
from .files import MAX_UPLOAD_BYTES
from .logs import LinesPerSecond, log_update
from .metrics import Metrics
from .outcome import DONE, Outcome, Status
from .overdue import Reclaim
from .recording import Recorder, handled
from .redelivery import Deliveries
from .router import Match
from .rules import ImplausibleMigration, chat_migration
from .session import AlreadyApplied, SessionSlot
from .storage import (
    Conflict,
    DeadLetter,
    DueTimer,
    OptimisticStorage,
    RunAgain,
    StaleRead,
    Storage,
    TimerChange,
)
from .telegram import BotApi, decode_update
from .types import Update
from .unit import Claim, LockTurns, TimerClaim, Unit, UnitOfWork

__all__ = ["Outcome", "Pipeline", "Status"]

log = logging.getLogger("bot.pipeline")

# How long a moved chat's old id keeps pointing at the new one: as long as processed update ids are
# kept, past Telegram's 24 h of redelivering an update.
KEEP_MOVES = 25 * 3600.0

# How long recording a dead letter may take once an update's own attempt has used up its deadline: the
# request deadline (REQUEST_DEADLINE, at most 55 s) plus this stays within Telegram's 60 s.
RECORD_WITHIN = 5.0


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
        # The storage's optimistic transactions, when asked for and offered: checked once here, since an
        # isinstance() check on a runtime protocol costs ~2% of a request.
        self._optimistic = storage if optimistic and isinstance(storage, OptimisticStorage) else None
        self.optimistic = self._optimistic is not None
        self.deadline = deadline  # seconds for one delivery (REQUEST_DEADLINE)
        # When an update failing transiently again and again is recorded as a dead letter.
        self.give_up = give_up or TransientFailures(deliveries=5, seconds=300.0)
        self._recorder = Recorder(storage, me, self.api, lease)  # what failed for good (bot.recording)
        self._deliveries = Deliveries()  # redeliveries answered from memory (bot.redelivery)
        # Every update's REQUEST_DEADLINE, on one timer; what an attempt still running RECORD_WITHIN past
        # it holds (its code ignored the cancellation) is taken back (bot.overdue).
        self.deadlines = Deadlines(RECORD_WITHIN, Reclaim(bot, storage, metrics, deadline))
        self.lock_turns = LockTurns()  # a key's attempts with locks, two at a time here (bot.unit)
        # A line per update, and per timer fire, or a count of them when busy (bot.logs).
        self.update_lines = LinesPerSecond(log, "update")
        self.timer_lines = LinesPerSecond(log, "timer")
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
            if self.update_lines.allow(outcome):
                chat = update.chat
                log_update(log, update.update_id, None if chat is None else chat.id, outcome, seconds)

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
            if self.timer_lines.allow(outcome):
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

            async def fresh() -> tuple[Context[Any], Match]:
                return timer_context(timer, self.me, self.api), [handler]

            outcome = await self._apply(*await fresh(), fresh, claim=TimerClaim)
        except BaseException as caught:  # (a SystemExit in a fire's task would stop the event loop)
            failed = as_failure(caught)
            if failed is None:
                raise
            error = failed.error if isinstance(failed, _Hooked) else failed
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
        try:
            if await self._deliveries.done_here(update_id, deadline):
                return Outcome(Status.DUPLICATE)
        except TimeoutError:
            # That attempt outlived its own deadline (a handler swallowed the cancellation): a transient
            # failure of the update like any, or its chat would wait for it for as long as it runs.
            running = TimeoutError(f"an earlier delivery of it is still running after {self.deadline:g} s")
            return await self._failed_transiently(update, running)
        with self._deliveries.running(update_id):
            outcome = await self._attempt(update, deadline)
        if outcome.status in DONE and not outcome.to_send:
            self._deliveries.remember(update_id)
        return outcome

    async def _attempt(self, update: Update, deadline: float) -> Outcome:
        """One delivery. A transient failure is Telegram's to retry, until the update has failed so too
        often for too long (`give_up`): then it is recorded as a dead letter, so that its chat moves on."""
        try:
            outcome = await self._run(update, deadline)
        except Exception as error:
            if not is_transient(error):
                raise
            return await self._failed_transiently(update, error)
        self.give_up.succeeded(update.update_id)
        return outcome

    async def _failed_transiently(self, update: Update, error: Exception) -> Outcome:
        """TryLater, or, once the update has failed so too often for too long, its dead letter."""
        failures = self.give_up.failed(update.update_id, time.monotonic())
        if failures is None:
            raise TryLater(self._why(error)) from error
        # The attempt may have used up the deadline: recording gets its own few seconds.
        seconds = time.monotonic() - failures.first
        line = f"gave up after {failures.count} transient failures in {seconds:.0f} s: {self._why(error)}"
        try:
            async with asyncio.timeout(RECORD_WITHIN):
                return await self._recorder.record(
                    update, error, hook=None, attempts=failures.count, line=line
                )
        except Exception as failure:
            if is_transient(failure):  # the database is still away: nothing recorded, 503 again
                raise TryLater(f"{line}; and could not record it: {self._why(failure)}") from failure
            raise

    async def _run(self, update: Update, deadline: float, *, replay: bool = False) -> Outcome:
        with self.deadlines.within(deadline, update):  # (asyncio.timeout_at's, on one timer: bot.deadline)
            try:
                return await self._route(update, replay=replay)
            except RunAgain:
                # Nothing of it was applied, and the storage dealt with the cause (a pooler found).
                return await self._route(update, replay=replay)

    def _why(self, error: BaseException) -> str:
        if isinstance(error, TimeoutError) and not error.args:  # (its str() may be the bot's code)
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
                work = partial(self._apply, ctx, found, partial(self._match, ctx.update), replay=replay)
            if work is None:
                return Outcome(Status.IGNORED)
            return await work()
        except _Hooked as hooked:
            error, hook = hooked.error, None
        except BaseException as caught:  # (the bot's code may raise one: SystemExit, a stray CancelledError)
            failed = as_failure(caught)
            if failed is None or is_transient(failed):
                raise
            error = failed
        # One bad update must not wedge its chat: Telegram would redeliver it for 24 hours.
        try:
            return await self._recorder.record(update, error, hook=hook, replay=replay)
        except Exception as failure:
            if hook is None or is_transient(failure):
                raise
            # What the hook did could not be stored (a reply the database refuses): record without it.
            return await self._recorder.record(update, failure, hook=None, replay=replay)

    def _unit(
        self, update: Update, *, optimistic: bool = False, replay: bool = False, claim: type[Claim] = Claim
    ) -> AbstractAsyncContextManager[Unit]:
        """The update's transactions (`bot.unit`), the bot's storage's optimistic one when asked for."""
        if optimistic and self._optimistic is not None:
            main = self._optimistic.optimistic_transaction()
        else:
            main = self.storage.transaction()
        return UnitOfWork(
            self.storage,
            main,
            self.bot.sessions.values(),
            lambda tx: claim(tx, self.me.id, update.update_id, replay=replay),
        )

    async def _match(self, update: Update) -> tuple[Context[Any], Match]:
        """A fresh context for the update, and the handlers that want it."""
        ctx: Context[Any] = Context(update, self.me, self.api)
        return ctx, await self.bot.match(ctx, kind) if (kind := update.kind) is not None else []

    async def _apply(
        self,
        ctx: Context[Any],
        found: Match,
        fresh: Callable[[], Awaitable[tuple[Context[Any], Match]]],
        *,
        replay: bool = False,
        claim: type[Claim] = Claim,
    ) -> Outcome:
        """Apply an update, or a timer's fire (`claim`), without locks first when the storage offers
        it; `fresh` makes a new context and match for each attempt after the first."""
        if self.optimistic and not replay:  # (a replay's claim is taking its dead letter: with locks)
            for attempt in (1, 2):
                try:
                    return await self._apply_in(ctx, found, optimistic=True, claim=claim)
                except Conflict as conflict:
                    # Nothing of that attempt was applied or sent. A fresh context and match, so nothing
                    # the first run queued or set is left over; with locks the update is applied exactly
                    # once, or recognised as a redelivery (a fire, as one fired before). A stale
                    # remembered session is first retried once more without locks, from the current row
                    # that came back with the refusal.
                    self.metrics.optimistic_conflicts.inc()
                    ctx, found = await fresh()
                    if attempt == 2 or not isinstance(conflict, StaleRead):
                        break
        keys = (c.key(ctx.update) for c in self.bot.sessions.values() if not c.lazy)
        async with self.lock_turns.hold(key for key in keys if key is not None):
            return await self._apply_in(ctx, found, optimistic=False, replay=replay, claim=claim)

    async def _apply_in(
        self,
        ctx: Context[Any],
        found: Match,
        *,
        optimistic: bool,
        replay: bool = False,
        claim: type[Claim] = Claim,
    ) -> Outcome:
        update = ctx.update
        status = Status.APPLIED if found else Status.IGNORED  # (ignored: a replay nothing wants now)
        hooked = False
        try:
            async with self._unit(update, optimistic=optimistic, replay=replay, claim=claim) as unit:
                slots = unit.slots(self.bot.sessions, update)
                ctx.attach_sessions(slots)
                try:
                    try:
                        for slot in unit.in_lock_order(slots.values()):
                            await slot.load()
                        if found:  # (a replay's update that no handler wants now only takes its letter)
                            await self.bot.run(ctx, found)
                            if ctx.timers:
                                self._check_timers(ctx.timers)
                    except AlreadyApplied:  # the storage's business, not the bot's
                        raise  # (and so is an optimistic attempt's Conflict: as_failure lets it by)
                    except BaseException as caught:
                        hook = self.bot.error_hook
                        error = as_failure(caught, steered=optimistic)
                        if hook is None or error is None or is_transient(error):
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
        except BaseException as caught:
            # After the hook ran, a failure (its own, or saving what it did) is recorded without it. (A
            # Conflict passes by: the update runs again, hook included, as the attempt applied nothing.)
            failure = as_failure(caught, steered=optimistic) if hooked else None
            if failure is not None and not is_transient(failure):
                raise _Hooked(failure) from caught
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
        handled(ctx.update, error)

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
