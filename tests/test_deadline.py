"""The request deadline on one shared timer (bot.deadline): what asyncio.timeout_at does, per block."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from bot.deadline import Deadlines

pytestmark = pytest.mark.anyio

LONG = 60.0  # a sleep no test waits out: the deadline ends it


def _in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def stubborn(deadlines: Deadlines, seconds: float, release: asyncio.Event) -> None:
    """A block whose code swallows its cancellation (a bare `except:`) and runs until `release`."""
    with deadlines.within(_in(seconds), "stubborn"):
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()


async def test_a_block_past_its_deadline_ends_in_timeout_error_and_leaves_its_task_uncancelled() -> None:
    deadlines = Deadlines()
    with pytest.raises(TimeoutError), deadlines.within(_in(0.05)):
        await asyncio.sleep(LONG)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # the task goes on: nothing cancels it later


async def test_each_block_ends_at_its_own_deadline_whatever_the_order_they_began_in() -> None:
    deadlines = Deadlines()
    ended: list[str] = []

    async def run(name: str, seconds: float) -> None:
        try:
            with deadlines.within(_in(seconds)):
                await asyncio.sleep(LONG)
        except TimeoutError:
            ended.append(name)

    # The later deadline first: the timer must be moved to the sooner one, then armed for the later.
    later = asyncio.create_task(run("later", 0.3))
    sooner = asyncio.create_task(run("sooner", 0.05))
    await asyncio.wait_for(asyncio.gather(later, sooner), LONG)
    assert ended == ["sooner", "later"]


async def test_a_block_that_ends_in_time_is_not_cancelled_afterwards() -> None:
    deadlines = Deadlines()
    with deadlines.within(_in(0.05)):
        await asyncio.sleep(0)
    other = asyncio.create_task(asyncio.sleep(LONG))  # keeps the timer's loop turning past the deadline
    with deadlines.within(_in(0.2)):
        await asyncio.sleep(0.1)  # past the first block's deadline: its timer fires, finds nothing of it
    other.cancel()


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    deadlines = Deadlines()

    async def run() -> None:
        with deadlines.within(_in(LONG)):
            await asyncio.sleep(LONG)

    task = asyncio.create_task(run())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_outside_cancellation_arriving_with_the_deadline_is_not_turned_into_timeout_error() -> None:
    deadlines = Deadlines()
    seen: list[type[BaseException]] = []

    async def run() -> None:
        try:
            with deadlines.within(_in(0.05)):
                try:
                    await asyncio.sleep(LONG)
                finally:
                    task.cancel()  # someone else cancels too, before the block is left
        except BaseException as exc:
            seen.append(type(exc))
            raise

    task = asyncio.create_task(run())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [asyncio.CancelledError]


async def test_a_block_that_ignores_its_cancellation_is_handed_over_after_its_grace_and_again_while_it_runs() -> (
    None
):
    """`overdue_after`: a block still running that long past its deadline (its code swallowed the
    cancellation) is handed to `on_overdue` with its task, what it was entered with and how late it is,
    then again every `overdue_after` until it ends; a block that ends when cancelled never is."""
    told: list[tuple[asyncio.Task[Any], object, float, bool]] = []
    thrice = asyncio.Event()

    def overdue(task: asyncio.Task[Any], what: object, late: float, first: bool) -> None:
        told.append((task, what, late, first))
        if len(told) == 3:
            thrice.set()

    deadlines = Deadlines(0.1, overdue)
    release = asyncio.Event()

    async def obedient() -> None:
        with pytest.raises(TimeoutError), deadlines.within(_in(0.05), "obedient"):
            await asyncio.sleep(LONG)

    task = asyncio.create_task(stubborn(deadlines, 0.05, release))
    await obedient()
    await asyncio.wait_for(thrice.wait(), LONG)  # at 0.05 + 0.1, + 0.2, + 0.3
    release.set()
    await task
    count = len(told)
    await asyncio.sleep(0.2)
    assert len(told) == count == 3  # none after it ended
    assert [(t, what, first) for t, what, _, first in told] == [
        (task, "stubborn", True),
        (task, "stubborn", False),
        (task, "stubborn", False),
    ]
    lates = [late for _, _, late, _ in told]
    assert lates == sorted(lates) and all(late >= 0.1 * n - 0.01 for n, late in enumerate(lates, 1))


async def test_a_block_cancelled_late_by_a_stalled_loop_gets_its_whole_grace_to_end() -> None:
    """The grace runs from the cancellation, not from the deadline: after the event loop stalled past
    both (a synchronous call somewhere), a block that heeds its cancellation but needs a round trip to
    end (its rollback) was handed to `on_overdue` at once, its connections closed and itself named as
    ignoring the cancellation."""
    told: list[object] = []
    deadlines = Deadlines(0.2, lambda task, what, late, first: told.append(what))

    async def rolling_back() -> None:
        try:
            await asyncio.sleep(LONG)
        finally:
            await asyncio.sleep(0.01)  # (its rollback's round trip)

    async def obedient() -> None:
        with pytest.raises(TimeoutError), deadlines.within(_in(0.05), "obedient"):
            await rolling_back()

    task = asyncio.create_task(obedient())
    await asyncio.sleep(0)
    time.sleep(0.4)  # noqa: ASYNC251 (the stall itself: the loop runs nothing past the deadline and its grace)
    await task
    assert told == []


async def test_an_on_overdue_that_raises_leaves_the_other_deadlines_enforced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The timer's pass ended at the exception, unarmed: blocks after the overdue one went past their
    deadlines uncancelled until something else armed it."""

    def overdue(task: asyncio.Task[Any], what: object, late: float, first: bool) -> None:
        raise RuntimeError("reclaiming failed")

    deadlines = Deadlines(0.05, overdue)
    release = asyncio.Event()
    task = asyncio.create_task(stubborn(deadlines, 0.02, release))
    await asyncio.sleep(0)
    started = time.monotonic()
    try:
        # Entered before the failing pass (stubborn's: cancelled at 0.02, handed over at 0.07), due after.
        with pytest.raises(TimeoutError), deadlines.within(_in(0.1), "later"):
            await asyncio.wait_for(
                release.wait(), 5
            )  # (not ended by its deadline: TimeoutError all the same)
        assert time.monotonic() - started < 2
    finally:
        release.set()
        await task
    assert "taking back what a block past its deadline holds failed" in caplog.text
