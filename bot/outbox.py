"""Sending what the handlers queued: after the commit, within Telegram's flood limits, and again after a
crash or a failure.

Every send takes a slot in two budgets first, the whole bot's (about 30/s) and its chat's (20/min in a
group, 1/s in a private chat), reserved in the database so that every process shares them. A call that
has to wait, for a budget, for a 429's `retry_after` or for a backoff, waits in the outbox: its row gets
a new due time and the sweeper (of any process) sends it then. Nothing waits in memory, so a restart
loses no waiting reply. Only the first unsent call of a chat may go, so a chat's replies keep their
order even when one of them has to wait.

A call is marked sent only once the Bot API confirmed it. A process that dies between sending and
marking leaves the call to be sent again when its lease runs out: Telegram has no idempotency key, so
that one window (milliseconds) is the only way a reply can be doubled; none can be lost. A call that
cannot be sent within the give-up horizon is marked failed, counted and logged; its update stays
applied.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .metrics import Metrics
from .storage import Budget, PendingCall, Storage, StorageUnavailable
from .telegram import BotApi, BotApiError

__all__ = ["Clock", "Limits", "Outbox", "SystemClock"]

log = logging.getLogger("bot.outbox")

# Processed update ids must outlive Telegram's redelivery window (24 h for messages) with margin.
KEEP_UPDATES = 25 * 3600.0
KEEP_SENT = 24 * 3600.0
# The first retry after a 5xx or a network error; each further one waits twice as long, up to a cap.
BACKOFF_BASE = 1.0
# Sends at once from one process's sweeper: enough to fill the global budget at a distant API's latency.
SENDS_IN_FLIGHT = 16
WHOLE_BOT = "*"
# Seconds of jitter between reserving a slot and the request reaching Telegram, allowed for in budgets
# (measured on loopback under load: bench/README.md, "Outbox burst").
SEND_MARGIN = 0.1
_GO = object()  # a reservation's verdict: send now
_T = TypeVar("_T")


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch: the same scale in every process, since budgets are shared."""


class SystemClock:
    def time(self) -> float:
        return time.time()


@dataclass(frozen=True)
class Limits:
    """Telegram's flood limits and our retry policy (README: OUTBOX_* and SEND_RATE_* settings)."""

    per_second: int = 30  # the whole bot
    group_per_minute: int = 20
    private_per_second: int = 1
    backoff_max: float = 60.0
    give_up_after: float = 3600.0

    def budgets(self, chat: str | None) -> list[Budget]:
        """The budgets a send to `chat` takes a slot in. A positive chat id is a user (a private chat);
        negative ids and @usernames are groups and channels."""
        budgets = [_budget(WHOLE_BOT, self.per_second, 1.0, burst=3)]
        if chat is not None:
            if chat.lstrip("-").isdigit() and int(chat) > 0:
                budgets.append(_budget(chat, self.private_per_second, 1.0, burst=1))
            else:
                budgets.append(_budget(chat, self.group_per_minute, 60.0, burst=3))
        return budgets

    def backoff(self, attempts: int, rng: random.Random) -> float:
        """Seconds before the next try after `attempts` failed ones: doubling up to the cap, each picked
        between half and all of it, so senders that failed together do not retry together."""
        return min(self.backoff_max, BACKOFF_BASE * 2.0 ** min(attempts, 60)) * rng.uniform(0.5, 1.0)


def _budget(key: str, count: int, per: float, *, burst: int) -> Budget:
    """At most `count` sends in any `per` seconds, `burst` of them back to back.

    GCRA allows burst + ceil(window / interval) - 1 sends in a window. The window is taken SEND_MARGIN
    longer than `per`: sends reserved a few milliseconds apart can reach Telegram closer together than
    that (one request waits for a connection, the next does not), and the limit is counted there.
    """
    burst = max(1, min(burst, count))
    return Budget(key, (per + SEND_MARGIN) / (count - burst + 1), burst)


class Outbox:
    """Sends leased calls in the background and tracks the tasks so shutdown can wait for them."""

    def __init__(
        self,
        storage: Storage,
        api: BotApi | None,
        metrics: Metrics,
        *,
        lease: float = 30.0,
        limits: Limits | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._storage = storage
        self._api = api  # None: local trial without a token; calls are logged instead of sent
        self._metrics = metrics
        self._lease = lease
        self.limits = limits or Limits()
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        # When this process next has a deferred call due, and chats with a call held behind an earlier
        # one that this process is sending: the sweeper looks again as soon as either can go.
        self._wake_at = math.inf
        self._waiting_chats: set[str] = set()
        self._wake = asyncio.Event()
        self._budget_spent = False

    def send_soon(self, calls: Sequence[PendingCall]) -> None:
        if calls:
            task = asyncio.create_task(self.send(calls))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def send(self, calls: Sequence[PendingCall]) -> None:
        """Try each call in order. One that must wait is deferred in the outbox, and the later calls of
        its chat then wait behind it (reserve_send says so), while other chats' calls go on."""
        for call in calls:
            if await self._guarded(call, self._reserve(call)) is _GO:
                await self._guarded(call, self._deliver(call))

    async def sweep(self, limit: int = 100) -> int:
        """Send the calls that are due: deferred, retried, or left by a crashed sender. Returns how
        many were taken.

        Each is the first unsent call of its chat, so they may be sent concurrently without breaking
        any chat's order. Slots are reserved one call at a time (a quick query) while the sends run
        concurrently (slow, across the network). Once the whole bot's budget is spent, the calls not
        tried yet go back in one statement, due when the budget has a burst's worth of slots again,
        rather than each asking for a slot in vain.
        """
        if self._budget_spent:
            limit = min(limit, SENDS_IN_FLIGHT)  # the budget will not allow many more at once
        calls = await self._storage.claim_due(limit, self._lease, self._clock.time())
        self._budget_spent = False
        gate = asyncio.Semaphore(SENDS_IN_FLIGHT)
        sending: set[asyncio.Task[object]] = set()
        for index, call in enumerate(calls):
            verdict = await self._guarded(call, self._reserve(call))
            if isinstance(verdict, float):
                self._budget_spent = True
                await self._guarded(call, self._hand_back(calls[index + 1 :], verdict))
                break
            if verdict is _GO:
                await gate.acquire()
                task = asyncio.create_task(self._guarded(call, self._deliver(call)))
                task.add_done_callback(lambda _: gate.release())
                sending.add(task)
        if sending:
            await asyncio.wait(sending)
        return len(calls)

    async def _guarded(self, call: PendingCall, step: Awaitable[_T]) -> _T | None:
        """Run one step for a call. Never raises: whatever goes wrong leaves the call leased, and the
        sweeper takes it again when the lease runs out."""
        try:
            return await step
        except StorageUnavailable as exc:
            log.warning("outbox %d: %s; it will be tried again after its lease", call.id, exc)
        except Exception:
            log.exception("outbox %d: unexpected error; it will be tried again after its lease", call.id)
        return None

    async def _reserve(self, call: PendingCall) -> object:
        """_GO when the call may be sent now. Otherwise it is dealt with here (deferred, or given up),
        and the answer is None, or the time the whole bot's budget allows a send, when that is why."""
        now = self._clock.time()
        if now - call.created_at >= self.limits.give_up_after:
            await self._give_up(call, now)
            return None
        if self._api is None:
            return _GO
        reservation = await self._storage.reserve_send(call, self.limits.budgets(call.chat), now)
        if reservation is None:
            # An earlier call to this chat is unsent and goes first. Due now, this one is taken as soon
            # as it is its chat's first unsent call.
            self._metrics.outbox_waits.labels("order").inc()
            await self._storage.defer([call.id], now)
            if call.chat is not None:
                self._waiting_chats.add(call.chat)
            return None
        if reservation.wait <= 0:
            return _GO
        until = now + reservation.wait
        whole_bot = reservation.blocked_by == WHOLE_BOT
        self._metrics.outbox_waits.labels("bot_budget" if whole_bot else "chat_budget").inc()
        await self._storage.defer([call.id], until)
        self._wake_up_at(until)
        return until if whole_bot else None

    async def _hand_back(self, calls: Sequence[PendingCall], budget_allows_at: float) -> None:
        if calls:
            bot = self.limits.budgets(None)[0]
            until = budget_allows_at + bot.interval * (bot.burst - 1)
            await self._storage.defer([call.id for call in calls], until)
            self._wake_up_at(until)

    async def _deliver(self, call: PendingCall) -> None:
        now = self._clock.time()
        if self._api is None:
            log.info("local trial (no BOT_TOKEN), not sent: %s %s", call.method, call.params)
            await self._storage.mark_sent(call.id)
            return
        try:
            await self._api.call(call.method, call.params)
        except BotApiError as exc:
            await self._failed(call, exc, now)
        else:
            self._metrics.api_calls.labels(call.method, "sent").inc()
            await self._storage.mark_sent(call.id)
        if call.chat in self._waiting_chats:
            self._waiting_chats.discard(call.chat)
            self._wake_up_at(now)

    async def _failed(self, call: PendingCall, exc: BotApiError, now: float) -> None:
        if exc.retry_after is not None:
            everything = await self._storage.pause_sends(call.chat, now + exc.retry_after, now)
            scope = "bot" if everything else "chat"
            self._metrics.api_calls.labels(call.method, "rate_limited").inc()
            self._metrics.flood_waits.labels(scope).inc()
            log.warning(
                "outbox %d: 429 for chat %s: %s sends paused for %g s",
                call.id,
                call.chat,
                "all" if everything else "this chat's",
                exc.retry_after,
                extra={"chat": call.chat, "outcome": "rate_limited"},
            )
            await self._storage.mark_failed(call.id, str(exc), retry_in=exc.retry_after, now=now)
            self._wake_up_at(now + exc.retry_after)
        elif exc.permanent:
            self._metrics.api_calls.labels(call.method, "failed").inc()
            log.warning(
                "outbox %d: %s (not retried)", call.id, exc, extra={"chat": call.chat, "outcome": "failed"}
            )
            await self._storage.mark_failed(call.id, str(exc), retry_in=None, now=now)
        else:
            delay = self.limits.backoff(call.attempts, self._rng)
            self._metrics.api_calls.labels(call.method, "retry").inc()
            log.warning(
                "outbox %d: %s (try %d; next in %.1f s)",
                call.id,
                exc,
                call.attempts + 1,
                delay,
                extra={"chat": call.chat, "outcome": "retry"},
            )
            if exc.may_have_arrived:
                # Telegram has no idempotency key: this is the one doubling window besides a crash.
                log.warning(
                    "outbox %d: the first attempt may have reached Telegram; if it did, the retry"
                    " sends this reply twice",
                    call.id,
                    extra={"chat": call.chat, "outcome": "retry"},
                )
            await self._storage.mark_failed(call.id, str(exc), retry_in=delay, now=now)
            self._wake_up_at(now + delay)

    async def _give_up(self, call: PendingCall, now: float) -> None:
        self._metrics.outbox_given_up.labels(call.method).inc()
        log.error(
            "outbox %d: gave up on %s to chat %s after %d tries in %.0f s (the update stays applied)",
            call.id,
            call.method,
            call.chat,
            call.attempts,
            now - call.created_at,
            extra={"chat": call.chat, "outcome": "gave_up"},
        )
        reason = f"gave up after {call.attempts} tries in {self.limits.give_up_after:g} s"
        await self._storage.mark_failed(call.id, reason, retry_in=None, now=now)

    def _wake_up_at(self, when: float) -> None:
        if when < self._wake_at:
            self._wake_at = when
            self._wake.set()

    async def run_sweeper(self, interval: float, limit: int = 100) -> None:
        """Until cancelled: sweep when a call this process deferred is due, or every `interval`
        seconds for what other processes deferred or a crash left; prune old rows hourly. No error
        ends it: each is logged and the next pass tries again."""
        next_prune = self._clock.time()
        while True:
            if self._wake_at <= self._clock.time():
                self._wake_at = math.inf
            taken = 0
            try:
                taken = await self.sweep(limit)
                if self._clock.time() >= next_prune:
                    pruned = await self._storage.prune(KEEP_UPDATES, KEEP_SENT)
                    log.debug("pruned %d old rows", pruned)
                    next_prune = self._clock.time() + 3600
            except StorageUnavailable as exc:
                log.warning("outbox sweeper: %s", exc)
            except Exception:
                log.exception(
                    "outbox sweeper: this round failed and was skipped; trying again in %g s", interval
                )
            if taken == limit and not self._budget_spent:
                continue  # there may be more due than one pass takes
            deadline = self._clock.time() + interval
            while (delay := min(deadline, self._wake_at) - self._clock.time()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    break

    async def drain(self, within: float) -> None:
        """Wait for the sends under way (graceful shutdown); what does not finish is left leased."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within)
