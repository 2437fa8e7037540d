"""Firing due timers: a loop in every process, picking what is due and firing it through the pipeline.

A timer is scheduled by a handler (`ctx.schedule`) and stored in the update's transaction. Here it is
picked, leased to this process for a while (`Storage.claim_due_timers`), and fired: `Pipeline.fire` runs
its handler in a transaction of its own whose claim deletes the timer, so a fire commits exactly once
however many processes pick it, and one that was rolled back (a crash, a kill -9, a database fault)
leaves the timer to be picked again once its lease runs out. Only the earliest timer of a key is picked
at a time, so a key's timers fire in order, one after the other; timers of different keys fire
concurrently, up to TIMER_CONCURRENCY at once per process (a fire still running when its lease ends
no longer counts: one that never ends must not hold its slot for good).

The loop looks every OUTBOX_SWEEP_INTERVAL seconds, and at once when this process commits a timer due
sooner: `after=0` work starts right after its update's commit, and a timer another process scheduled is
fired within an interval of its due time. A timer that was due while no process ran is fired when one
starts; `ctx.timer.late` tells its handler how late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from functools import partial

from .failures import TryLater
from .outbox import Clock, Outbox, SystemClock
from .pipeline import Pipeline
from .storage import DueTimer, StorageUnavailable, TimerChange

__all__ = ["TimerLoop"]

log = logging.getLogger("bot.timers")

# Timers picked at once, per fire that may run at once: one pick's query is shared by that many fires,
# while a process never holds many more timers leased than it is about to fire.
PICKED_PER_SLOT = 4


class TimerLoop:
    """Picks due timers and fires them, in the background, until stopped."""

    def __init__(
        self,
        pipeline: Pipeline,
        outbox: Outbox,
        *,
        lease: float,
        interval: float,
        concurrency: int = 4,
        clock: Clock | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._storage = pipeline.storage
        self._outbox = outbox
        self._lease = lease
        self._interval = interval
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._clock = clock or SystemClock()
        self._firing: dict[int, asyncio.Task[None]] = {}  # by timer id, picked: running or waiting for a slot
        # Fires still running when their lease ran out: they no longer count against the slots, or one that
        # never ends (a handler awaiting what never comes) would hold its slot, and every chat's timers in
        # this process with it, for good. (Long work is allowed: such a fire may go on, and end well.)
        self._overdue: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()  # a wake-up, or a fire finished
        self._next_look = -math.inf
        self._wake_at = math.inf  # the earliest timer this process committed and has not looked for
        self._more = False  # the last pick was full: more may be due at once

    def wake(self, changes: Sequence[TimerChange]) -> None:
        """Told of timers this process committed (`Pipeline.on_schedule`): look again when they are due."""
        now = self._clock.time()
        due = [c.at if c.at is not None else now + (c.after or 0.0) for c in changes if c.handler is not None]
        if due and min(due) < self._wake_at:
            self._wake_at = min(due)
            self._changed.set()

    async def fire_due(self, limit: int | None = None) -> list[asyncio.Task[None]]:
        """Pick up to `limit` due timers (default: what this process may hold) and fire them, at most
        `concurrency` at once; returns their fires (await them to wait for them). Raises StorageUnavailable
        when the pick failed."""
        if limit is None:
            limit = self._concurrency * PICKED_PER_SLOT - self._counted()
        if limit <= 0:
            return []
        due = await self._storage.claim_due_timers(self._pipeline.me.id, limit, self._lease)
        started = []
        for timer in due:
            if timer.id in self._firing:
                continue  # still firing here past its lease (picked again for that): not twice at once
            task = asyncio.create_task(self._fire(timer))
            self._firing[timer.id] = task
            task.add_done_callback(partial(self._fired, timer.id))
            started.append(task)
        return started

    def _counted(self) -> int:
        """The fires that count against the slots: picked, and not past their lease; of those past it,
        all but `concurrency`. Each may hold a pooled connection (with locks): a handler that hangs every
        time then stops this process's timers after that many more, not every update for want of a
        connection."""
        return len(self._firing) - min(len(self._overdue), self._concurrency)

    def _fired(self, timer_id: int, task: asyncio.Task[None]) -> None:
        del self._firing[timer_id]
        self._overdue.discard(task)
        self._changed.set()

    async def _fire(self, timer: DueTimer) -> None:
        task = asyncio.current_task()
        assert task is not None
        holding = False

        def overdue() -> None:
            nonlocal holding
            if holding:
                holding = False
                self._slots.release()
            self._overdue.add(task)
            self._changed.set()

        try:
            await self._slots.acquire()
            holding = True
            late = asyncio.get_running_loop().call_later(self._lease, overdue)
            try:
                outcome = await self._pipeline.fire(timer)
            finally:
                late.cancel()
                if holding:
                    self._slots.release()
        except (StorageUnavailable, TryLater) as exc:
            log.warning("timer %d: not fired (%s); fired again once its lease runs out", timer.id, exc)
        except Exception:
            log.exception("timer %d: unexpected error; fired again once its lease runs out", timer.id)
        else:
            self._outbox.send_soon(outcome.to_send)

    async def run(self) -> None:
        """Until cancelled: pick and fire what is due once the timers picked before are running (none is
        waiting for a slot) and it is time to look (an interval passed, a timer this process committed is
        due, or the last pick was full). No error ends it: each is logged, and the next look tries again."""
        while True:
            self._changed.clear()
            now = self._clock.time()
            room = self._concurrency * PICKED_PER_SLOT - self._counted()
            ready = self._counted() <= self._concurrency
            if ready and (self._more or now >= min(self._next_look, self._wake_at)):
                self._next_look = now + self._interval
                if self._wake_at <= now:
                    self._wake_at = math.inf
                try:
                    self._more = len(await self.fire_due(room)) == room
                except StorageUnavailable as exc:
                    self._more = False
                    log.warning("timers: %s", exc)
                except Exception:
                    self._more = False
                    log.exception(
                        "timers: this look failed and was skipped; trying again in %g s", self._interval
                    )
                continue
            # Busy: wait for fires to finish. Otherwise: for the next look, or a wake-up before it.
            delay = None if self._more or not ready else max(0.0, min(self._next_look, self._wake_at) - now)
            # (Not asyncio.wait_for: on 3.11 it could lose a cancellation arriving as the wait ends.)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._changed.wait()

    async def drain(self, within: float) -> None:
        """After `run` is cancelled (shutdown): wait for the fires picked (under way or waiting for a slot),
        then cancel what is left (rolled back or not begun: fired again once its lease runs out)."""
        if self._firing:
            await asyncio.wait(set(self._firing.values()), timeout=within)
        left = set(self._firing.values())
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
