"""How late the event loop runs what is due: the one sign of a handler's blocking code.

Every chat's updates, timers and sends run on one event loop. A handler that blocks it (`time.sleep`, a
CPU loop, a synchronous HTTP or database client) holds all of them up for as long as it runs, and
nothing else shows it: each update's own duration grows, but no error, no 503 until the deadlines pass.
`LoopLag` sleeps `interval` seconds again and again and measures how much later than asked it wakes:
a few milliseconds on a healthy loop, the blocking call's length when one ran (or, on a loop with more
ready work than it gets through, how long each waits for its turn). Each lag is observed in
`bot_event_loop_lag_seconds`; one past `warn_after` is logged as a warning, at most one line per
`log_every` seconds (with the count and worst of those left out since), so a handler blocking on every
update does not flood the log. The line names only the lag: what ran is not known cheaply, and the
update being handled then may identify a user.

Its cost is one timer per `interval` (0.5 s), whatever the traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .metrics import Metrics

__all__ = ["LoopLag"]

log = logging.getLogger("bot.loop")


class LoopLag:
    def __init__(
        self,
        metrics: Metrics,
        *,
        interval: float = 0.5,
        warn_after: float = 0.25,
        log_every: float = 10.0,
    ) -> None:
        self.metrics = metrics
        self.interval = interval
        self.warn_after = warn_after  # past what a loop busy with many ready callbacks lags
        self.log_every = log_every
        self._next_line = 0.0  # (time.monotonic()) no line before, only counted
        self._unlogged = 0
        self._worst = 0.0  # of those not logged

    async def run(self) -> None:
        """Measure until cancelled. Timed with time.monotonic(): uvloop's loop.time() counts whole
        milliseconds."""
        while True:
            asked = time.monotonic()
            await asyncio.sleep(self.interval)
            self.observe(max(0.0, time.monotonic() - asked - self.interval))

    def observe(self, lag: float) -> None:
        self.metrics.loop_lag.observe(lag)
        if lag < self.warn_after:
            return
        now = time.monotonic()
        if now < self._next_line:
            self._unlogged += 1
            self._worst = max(self._worst, lag)
            return
        since = (
            f"; {self._unlogged} more since the last line, the worst {self._worst:.3f} s"
            if self._unlogged
            else ""
        )
        log.warning(
            "the event loop was held up for %.3f s: every chat waited (a handler's blocking call:"
            " time.sleep, a CPU-bound loop, a synchronous client; await it, or run it in a thread;"
            " or more work than the process can do)%s",
            lag,
            since,
            extra={"duration": round(lag, 6)},
        )
        self._next_line = now + self.log_every
        self._unlogged, self._worst = 0, 0.0
