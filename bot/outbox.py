"""Sending what the handlers queued: after the commit, within Telegram's flood limits, and again after a
crash or a failure.

Every send takes a slot in two budgets first, the whole bot's (about 30/s) and its chat's (20/min in a
group, 1/s in a private chat), reserved in the database so that every process shares them (the rule:
`bot.send_budget`). The sender talks to its storage only through `OutboxStore`. A call that
has to wait, for a budget, for a 429's `retry_after` or for a backoff, waits in the outbox: its row gets
a new due time and the sweeper (of any process) sends it then. Nothing waits in memory, so a restart
loses no waiting reply. Only the first unsent call of a chat may go, so a chat's replies keep their
order even when one of them has to wait.

One answer costs only its own call. Each call has a total deadline (the client's, BOT_API_TIMEOUT),
shorter than the lease, and the same statement that reserves its slots renews its lease, so the lease
covers the call from the moment it is sent; a sender whose lease ran out meanwhile (behind slow calls
of the same update) learns there that another sender took the call, and leaves it. Every send runs in
a task of its own: a slow one holds up nothing but the later calls of its update. A 429 pauses its
chat; the whole bot pauses only on evidence that the limit hit is the bot's own (`FloodRule`), and then
for seconds. A group that became a supergroup gets its calls at its new id.

A call is marked sent only once the Bot API confirmed it, and a confirmed send whose marking failed is
marked again (each sweep, and at shutdown) until the database takes it, so the sweeper never sends it
again. Telegram has no idempotency key: a process that dies between Telegram's answer and the marking,
or whose database stays away until it exits, leaves the call to be sent again when its lease runs out
(docs/RELIABILITY.md lists these windows); none can be lost. A call that cannot be sent within the
give-up horizon is marked failed, counted and logged; its update stays applied.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .metrics import Metrics
from .send_budget import WHOLE_BOT, Budget, FloodRule, budgets_for, burst_again_at, flood_rule
from .storage import OutboxStore, PendingCall, StorageUnavailable
from .telegram import BotApi, BotApiError

__all__ = ["Clock", "Limits", "Outbox", "SystemClock"]

log = logging.getLogger("bot.outbox")

# Processed update ids must outlive Telegram's redelivery window (24 h for messages) with margin.
KEEP_UPDATES = 25 * 3600.0
KEEP_SENT = 24 * 3600.0
# The first retry after a 5xx or a network error; each further one waits twice as long, up to a cap.
BACKOFF_BASE = 1.0
# Sends at once from one process's sweeper: enough to fill the global budget at a distant API's latency.
# A send slower than that holds one of them, never the sweeper itself.
SENDS_IN_FLIGHT = 16
# At shutdown, after the grace period: how long the calls cut short get to record their outcome, and
# sends Telegram confirmed get to be recorded (the database may be slow then, as everything else).
RECORD_GRACE = 2.0
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
    bot_pause_max: float = 30.0  # the longest pause of every send a 429 may cause

    def flood_rule(self) -> FloodRule:
        return flood_rule(self.per_second, self.bot_pause_max)

    def budgets(self, chat: str | None) -> list[Budget]:
        """The budgets a send to `chat` takes a slot in (`bot.send_budget.budgets_for`)."""
        return budgets_for(
            chat,
            per_second=self.per_second,
            group_per_minute=self.group_per_minute,
            private_per_second=self.private_per_second,
        )

    def backoff(self, attempts: int, rng: random.Random) -> float:
        """Seconds before the next try after `attempts` failed ones: doubling up to the cap, each picked
        between half and all of it, so senders that failed together do not retry together."""
        return min(self.backoff_max, BACKOFF_BASE * 2.0 ** min(attempts, 60)) * rng.uniform(0.5, 1.0)


class Outbox:
    """Sends leased calls in the background and tracks the tasks so shutdown can finish them."""

    def __init__(
        self,
        storage: OutboxStore,
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
        # Every send under way (an update's calls, or one the sweeper started), and how many of them the
        # sweeper started; it looks again when one ends if it had no room left (`_starved`).
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeping = 0
        self._starved = False
        # The deadlines of the calls in flight, which close() brings forward; once it has, no call starts.
        self._in_flight: set[asyncio.Timeout] = set()
        self._stopping = False
        self._closing = False
        # Sends Telegram confirmed that the database has not recorded yet (mark_sent failed): recorded
        # again before every sweep, so this process's sweeper never sends them again.
        self._unrecorded: set[int] = set()
        # When this process next has a deferred call due, and chats with a call held behind an earlier
        # one that this process is sending: the sweeper looks again as soon as either can go.
        self._wake_at = math.inf
        self._waiting_chats: set[str] = set()
        self._wake = asyncio.Event()
        self._budget_spent = False

    def send_soon(self, calls: Sequence[PendingCall]) -> None:
        # Once shutdown has begun, they stay in the outbox for the next start's sweeper.
        if calls and not self._closing:
            self._start(self.send(calls))

    def _start(self, send: Coroutine[Any, Any, object], *, sweeping: bool = False) -> None:
        task = asyncio.create_task(send)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if sweeping:
            self._sweeping += 1
            task.add_done_callback(self._swept)

    def _swept(self, task: asyncio.Task[Any]) -> None:
        self._sweeping -= 1
        if self._starved:
            self._starved = False
            self._wake_up_at(self._clock.time())

    async def send(self, calls: Sequence[PendingCall]) -> None:
        """Send an update's calls: each chat's in order, different chats side by side, so that a slow
        answer holds up only its own chat. One that must wait is deferred in the outbox, and the later
        calls of its chat then wait behind it (reserve_send says so)."""
        chats: dict[str | None, list[PendingCall]] = {}
        for call in calls:
            chats.setdefault(call.chat, []).append(call)
        if len(chats) == 1:
            await self._send_in_order(calls)
        else:
            await asyncio.gather(*(self._send_in_order(in_chat) for in_chat in chats.values()))

    async def _send_in_order(self, calls: Sequence[PendingCall]) -> None:
        moved_to: int | None = None  # the chat turned out to be a supergroup now
        for call in calls:
            if moved_to is not None:
                call = _to_chat(call, moved_to)
            if await self._guarded(call, self._reserve(call)) is _GO:
                moved_to = await self._guarded(call, self._deliver(call)) or moved_to

    async def sweep(self, limit: int = 100) -> int:
        """Start sending the calls that are due: deferred, retried, or left by a crashed sender. Returns
        how many were taken. The sends run on in the background (`drain` waits for them): a slow one
        holds up neither the sweeper nor another chat.

        Each is the first unsent call of its chat, so they may be sent concurrently without breaking
        any chat's order. Slots are reserved one call at a time (a quick query) while the sends run
        concurrently (slow, across the network), at most SENDS_IN_FLIGHT at once. Once the whole bot's
        budget is spent, the calls not tried yet go back in one statement, due when the budget has a
        burst's worth of slots again, rather than each asking for a slot in vain.
        """
        await self._record_unrecorded()
        room = min(limit, SENDS_IN_FLIGHT - self._sweeping)
        calls = await self._storage.claim_due(room, self._lease, self._clock.time()) if room > 0 else []
        self._budget_spent = False
        # Took all it had room for while more may be due: look again as soon as a send ends.
        self._starved = len(calls) == room < limit
        for index, call in enumerate(calls):
            if call.id in self._unrecorded:
                continue  # sent: leased again now, and recorded at a later pass
            verdict = await self._guarded(call, self._reserve(call))
            if isinstance(verdict, float):
                self._budget_spent = True
                await self._guarded(call, self._hand_back(calls[index + 1 :], verdict))
                break
            if verdict is _GO:
                self._start(self._guarded(call, self._deliver(call)), sweeping=True)
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
        """_GO when the call may be sent now (its lease renewed from now). Otherwise it is dealt with
        here (put back, given up, or left to the sender that took it over), and the answer is None, or
        the time the whole bot's budget allows a send, when that is why."""
        now = self._clock.time()
        if self._stopping:
            await self._storage.defer([call.id], now)  # shutting down: the next start sends it at once
            return None
        if now - call.created_at >= self.limits.give_up_after:
            await self._give_up(call, now)
            return None
        if self._api is None:
            return _GO
        reservation = await self._storage.reserve_send(call, self.limits.budgets(call.chat), now, self._lease)
        if reservation.verdict == "go":
            return _GO
        if reservation.verdict == "lost":
            # Its lease ran out before it was sent, and another sender took it: that one sends it.
            self._metrics.outbox_waits.labels("taken_over").inc()
            log.info("outbox %d: its lease ran out before it was sent; another sender has it", call.id)
            return None
        if reservation.verdict == "behind":
            # An earlier call to this chat is unsent and goes first. Due now, this one is taken as soon
            # as it is its chat's first unsent call.
            self._metrics.outbox_waits.labels("order").inc()
            if call.chat is not None:
                self._waiting_chats.add(call.chat)
            return None
        until = now + reservation.wait
        whole_bot = reservation.blocked_by == WHOLE_BOT
        self._metrics.outbox_waits.labels("bot_budget" if whole_bot else "chat_budget").inc()
        self._wake_up_at(until)
        return until if whole_bot else None

    async def _hand_back(self, calls: Sequence[PendingCall], budget_allows_at: float) -> None:
        if calls:
            until = burst_again_at(self.limits.budgets(None)[0], budget_allows_at)
            await self._storage.defer([call.id for call in calls], until)
            self._wake_up_at(until)

    async def _deliver(self, call: PendingCall) -> int | None:
        """Send the call and record the outcome. Returns the chat's new id when Telegram said the group
        became a supergroup: the call (and every unsent call to that chat) now goes there."""
        now = self._clock.time()
        if self._api is None:
            log.info("local trial (no BOT_TOKEN), not sent: %s %s", call.method, call.params)
            await self._storage.mark_sent(call.id)
            return None
        moved_to = None
        try:
            await self._call(call)
        except BotApiError as exc:
            moved_to = await self._failed(call, exc, now)
        else:
            self._metrics.api_calls.labels(call.method, "sent").inc()
            await self._record_sent(call)
        if call.chat in self._waiting_chats:
            self._waiting_chats.discard(call.chat)
            self._wake_up_at(now)
        return moved_to

    async def _call(self, call: PendingCall) -> None:
        """The Bot API call, within the client's deadline, or less when shutdown cuts it short."""
        assert self._api is not None
        # Read only now, one call at a time: a claim of many calls holds none of their bytes.
        files = await self._storage.call_files(call.id) if call.has_files else ()
        try:
            async with asyncio.timeout(None) as deadline:
                self._in_flight.add(deadline)
                try:
                    await self._api.call(call.method, call.params, files=files)
                finally:
                    self._in_flight.discard(deadline)
        except TimeoutError:
            # Only close() sets this deadline (the client's own ends in BotApiError).
            raise BotApiError(call.method, "cut short by shutdown", may_have_arrived=True) from None

    async def _record_sent(self, call: PendingCall) -> None:
        try:
            await self._storage.mark_sent(call.id)
        except asyncio.CancelledError:
            self._unrecorded.add(call.id)  # cancelled at shutdown: close() records it
            raise
        except Exception as exc:
            self._unrecorded.add(call.id)
            log.warning(
                "outbox %d: sent, but recording it failed (%s); recording it again before the next sweep,"
                " so that it is not sent twice",
                call.id,
                exc,
                extra={"chat": call.chat, "outcome": "sent"},
            )
            self._wake_up_at(self._clock.time() + 1)

    async def _record_unrecorded(self) -> None:
        """Record the sends Telegram confirmed whose recording failed, while the database takes them."""
        for call_id in list(self._unrecorded):
            try:
                await self._storage.mark_sent(call_id)
            except Exception as exc:
                log.warning("outbox %d: sent, and still not recorded: %s", call_id, exc)
                return
            self._unrecorded.discard(call_id)

    async def _failed(self, call: PendingCall, exc: BotApiError, now: float) -> int | None:
        if exc.migrate_to_chat_id is not None and call.chat not in (None, str(exc.migrate_to_chat_id)):
            # "group chat was upgraded to a supergroup chat": the reply (and the chat's later ones)
            # goes to the new chat, at once, behind whatever that chat has waiting already.
            to = exc.migrate_to_chat_id
            moved = await self._storage.move_chat(call.chat, to)
            self._metrics.api_calls.labels(call.method, "moved").inc()
            log.info(
                "outbox %d: chat %s became %d; %d unsent call(s) go there now",
                call.id,
                call.chat,
                to,
                moved,
                extra={"chat": call.chat, "outcome": "moved"},
            )
            await self._storage.defer([call.id], now)
            self._wake_up_at(now)
            return to
        if exc.retry_after is not None:
            # No longer than a call is kept: an absurd retry_after (1e300) overflowed the database's
            # timestamps, and the chat's calls were neither sent nor given up on, ever.
            retry_after = min(exc.retry_after, self.limits.give_up_after)
            rule = self.limits.flood_rule()
            everything = await self._storage.pause_sends(call.chat, now + retry_after, now, rule)
            self._metrics.api_calls.labels(call.method, "rate_limited").inc()
            self._metrics.flood_waits.labels("bot" if everything else "chat").inc()
            log.warning(
                "outbox %d: 429 for chat %s: %s",
                call.id,
                call.chat,
                f"every send paused for {min(retry_after, rule.pause_max):g} s (429s from"
                f" {rule.chats} chats at once while sending near the whole bot's budget)"
                if everything
                else f"this chat's sends paused for {retry_after:g} s",
                extra={"chat": call.chat, "outcome": "rate_limited"},
            )
            await self._storage.mark_failed(call.id, str(exc), retry_in=retry_after, now=now)
            self._wake_up_at(now + (min(retry_after, rule.pause_max) if everything else retry_after))
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
        return None

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
                    # Not asyncio.wait_for: on 3.11 a cancellation arriving as the wait ends (a wake at
                    # shutdown) was lost, and the sweeper ran on, the shutdown waiting for it for good.
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    break

    async def drain(self, within: float) -> bool:
        """Wait up to `within` seconds for the sends under way; True when none is left."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within)
        return not self._tasks

    async def close(self, within: float) -> None:
        """Graceful shutdown, once the sweeper has stopped: no send starts any more; the ones under way
        get `within` seconds to finish, then their calls are cut short (recorded as may-have-arrived:
        the next start retries them) and calls not started yet are handed back, due at once; sends
        Telegram confirmed are recorded while the database answers. When this returns, nothing of the
        outbox runs any more: the pool and the HTTP client may close."""
        self._closing = True
        loop = asyncio.get_running_loop()
        if not await self.drain(within):
            self._stopping = True
            for deadline in self._in_flight:
                deadline.reschedule(loop.time())
            if not await self.drain(RECORD_GRACE):
                # Stuck on the database: what they hold stays leased, and is sent after the lease.
                for task in self._tasks:
                    task.cancel()
                await asyncio.wait(set(self._tasks))
        give_up_at = loop.time() + RECORD_GRACE
        await self._record_unrecorded()
        while self._unrecorded and loop.time() < give_up_at:
            await asyncio.sleep(0.2)
            await self._record_unrecorded()
        for call_id in self._unrecorded:
            log.error(
                "outbox %d: sent, but the database did not record it before shutdown: the next start sends"
                " it again",
                call_id,
            )


def _to_chat(call: PendingCall, chat_id: int) -> PendingCall:
    return dataclasses.replace(call, params={**call.params, "chat_id": chat_id})
