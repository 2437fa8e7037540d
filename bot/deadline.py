"""Deadlines that nearly never pass, each kind on one timer: every update's request deadline
(REQUEST_DEADLINE, `bot.pipeline`), every wait for a pooled connection (DB_ACQUIRE_TIMEOUT,
`bot.storage.postgres.connections`).

`asyncio.timeout_at` arms a timer per block and cancels it on the way out: with uvloop that is a libuv
timer made, started, stopped and closed for every update, whose deadline (25 s) is nearly never
reached. It was ~5% of an update's samples on workload T (py-spy). Here a block only enters a dict; one
timer, armed for the soonest deadline it knows of, wakes once per deadline period at most, cancels the
blocks past theirs and arms itself for the next. What a block past its deadline sees is what
`asyncio.timeout_at` gives: its task cancelled, and TimeoutError out of the block (unless something
else cancelled it too, which then goes on as CancelledError).

A block whose code ignores that cancellation (a bare `except:` in a handler) runs on for as long as it
likes. Given `overdue_after`, the same timer looks at a block again that long after cancelling it, and
every `overdue_after` after that while it still runs, and hands it to `on_overdue`: the owner of what the
block holds (the pipeline: its pooled connections) takes it back from outside the task. Nothing is
added to a block that ends in time.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["Deadlines", "Overdue"]

log = logging.getLogger(__name__)

# Told of a block still running `overdue_after` past its deadline: its task, what it was entered with,
# how many seconds past its deadline it is, and whether this is the first time it is told of it.
Overdue = Callable[["asyncio.Task[Any]", object, float, bool], None]


class Deadlines:
    """The deadlines of the blocks running now (`within`), and the one timer that enforces them."""

    def __init__(self, overdue_after: float | None = None, on_overdue: Overdue | None = None) -> None:
        """`on_overdue` is told of a block still running `overdue_after` seconds past its deadline (then
        again every `overdue_after` while it runs); neither given: nothing is watched past a deadline."""
        # Block -> its deadline (loop time); once past it and cancelled, when it is looked at again.
        self._blocks: dict[_Within, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None
        self.overdue_after = overdue_after  # (read when a deadline passes: a test may shorten it)
        self._on_overdue = on_overdue

    def within(self, deadline: float, what: object = None) -> _Within:
        """`with deadlines.within(when):` as `async with asyncio.timeout_at(when):` (loop time). `what`
        is handed to `on_overdue` if the block outlives its deadline by `overdue_after`."""
        return _Within(self, deadline, what)

    def _enter(self, block: _Within, deadline: float) -> None:
        self._blocks[block] = deadline
        loop = asyncio.get_running_loop()
        if deadline < self._timer_at or loop is not self._loop:
            self._arm(loop, deadline)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._loop, self._timer_at = loop, when
        self._timer = loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        assert self._loop is not None
        now, soonest = self._loop.time(), math.inf
        after, on_overdue = self.overdue_after, self._on_overdue
        for block, deadline in list(self._blocks.items()):
            if deadline > now:
                soonest = min(soonest, deadline)
                continue
            first = not block._expired
            if first:
                block.expire()
            else:  # cancelled at its deadline, and still running: its code ignored that
                assert on_overdue is not None
                try:
                    on_overdue(block._task, block._what, now - block._deadline, not block._told)
                except Exception:
                    # Not the end of this pass: the blocks after it still get their deadline, and the
                    # timer is armed again (a quiet bot would otherwise enforce none until its next update).
                    log.exception("taking back what a block past its deadline holds failed")
                block._told = True
            if after is None or on_overdue is None:
                del self._blocks[block]
            else:  # looked at again while it runs (its exit takes it out); the grace counts from the
                # cancellation, which a loop that stalled past the deadline delivers late
                self._blocks[block] = again = now + after
                soonest = min(soonest, again)
        if soonest < math.inf:
            self._arm(self._loop, soonest)


class _Within:
    __slots__ = ("_cancelling", "_deadline", "_deadlines", "_expired", "_task", "_told", "_what")

    def __init__(self, deadlines: Deadlines, deadline: float, what: object) -> None:
        self._deadlines = deadlines
        self._deadline = deadline
        self._what = what  # (for on_overdue)
        self._expired = False
        self._told = False  # handed to on_overdue before

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()  # cancellations asked before: not ours to turn into TimeoutError
        self._deadlines._enter(self, self._deadline)

    def expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._deadlines._blocks.pop(self, None)
        # As asyncio.Timeout does: our cancellation becomes TimeoutError, unless another one is pending.
        if self._expired and self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from exc
