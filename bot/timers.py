"""Firing due timers: a loop in every process, picking what is due and firing it through the pipeline.

A timer is scheduled by a handler (`ctx.schedule`) and stored in the update's transaction. Here it is
picked, leased to this process for a while (`Storage.claim_due_timers`), and fired: `Pipeline.fire` runs
its handler in a transaction of its own whose claim deletes the timer, so a fire commits exactly once
however many processes pick it, and one that was rolled back (a crash, a kill -9, a database fault)
leaves the timer to be picked again once its lease runs out. Only the earliest timer of a key is picked
at a time, so a key's timers fire in order, one after the other; timers of different keys fire
concurrently, up to TIMER_CONCURRENCY at once per process.

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
        self._firing: set[asyncio.Task[None]] = set()  # picked: running, or waiting for a slot
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
            limit = self._concurrency * PICKED_PER_SLOT - len(self._firing)
        if limit <= 0:
            return []
        due = await self._storage.claim_due_timers(self._pipeline.me.id, limit, self._lease)
        started = []
        for timer in due:
            task = asyncio.create_task(self._fire(timer))
            self._firing.add(task)
            task.add_done_callback(self._fired)
            started.append(task)
        return started

    def _fired(self, task: asyncio.Task[None]) -> None:
        self._firing.discard(task)
        self._changed.set()

    async def _fire(self, timer: DueTimer) -> None:
        try:
            async with self._slots:
                outcome = await self._pipeline.fire(timer)
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
            room = self._concurrency * PICKED_PER_SLOT - len(self._firing)
            ready = len(self._firing) <= self._concurrency
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), delay)

    async def drain(self, within: float) -> None:
        """After `run` is cancelled (shutdown): wait for the fires picked (under way or waiting for a slot),
        then cancel what is left (rolled back or not begun: fired again once its lease runs out)."""
        if self._firing:
            await asyncio.wait(set(self._firing), timeout=within)
        left = set(self._firing)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
