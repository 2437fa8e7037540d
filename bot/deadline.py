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
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

__all__ = ["Deadlines"]


class Deadlines:
    """The deadlines of the blocks running now (`within`), and the one timer that enforces them."""

    def __init__(self) -> None:
        self._blocks: dict[_Within, float] = {}  # block -> its deadline (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None

    def within(self, deadline: float) -> _Within:
        """`with deadlines.within(when):` as `async with asyncio.timeout_at(when):` (loop time)."""
        return _Within(self, deadline)

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
        for block, deadline in list(self._blocks.items()):
            if deadline <= now:
                del self._blocks[block]
                block.expire()
            else:
                soonest = min(soonest, deadline)
        if soonest < math.inf:
            self._arm(self._loop, soonest)


class _Within:
    __slots__ = ("_cancelling", "_deadline", "_deadlines", "_expired", "_task")

    def __init__(self, deadlines: Deadlines, deadline: float) -> None:
        self._deadlines = deadlines
        self._deadline = deadline
        self._expired = False

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
