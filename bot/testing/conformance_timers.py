"""The conformance suite's checks of durable timers (part of `bot.testing.conformance.CHECKS`).

Due-ness is set with `at=` in the past and `after=` an hour ahead, so the checks need no clock of their
own and run the same on a storage that keeps time by its database's clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from ..storage import DueTimer, Storage, TimerChange
from .conformance_tools import Check, StorageFactory

__all__ = ["TIMER_CHECKS"]

BOT = 7
LEASE = 30.0


def _timer(key: str, name: str, *, ago: float | None = None, payload: str = "null") -> TimerChange:
    """A timer due `ago` seconds ago (None: in an hour)."""
    origin = '{"message_id": 0, "chat": {"id": -5, "type": "group"}}'
    if ago is None:
        return TimerChange(key, name, "h", payload, origin, after=3600.0)
    return TimerChange(key, name, "h", payload, origin, at=time.time() - ago)


async def _schedule(storage: Storage, *changes: TimerChange) -> None:
    async with storage.transaction() as tx:
        await tx.schedule(BOT, changes)


async def _fire(storage: Storage, timer_id: int, *, hold: float = 0.0) -> bool:
    async with storage.transaction() as tx:
        claimed = await tx.claim_timer(BOT, timer_id)
        await asyncio.sleep(hold)  # a handler running: other fires overlap it
        return claimed


def _names(due: Sequence[DueTimer]) -> list[str]:
    return [timer.name for timer in due]


async def a_timer_fires_once_when_due(make: StorageFactory) -> None:
    storage = await make()
    await _schedule(storage, _timer("k", "due", ago=2, payload='{"n": 1}'), _timer("k2", "later"))
    [due] = await storage.claim_due_timers(BOT, 10, LEASE)
    assert (due.key, due.name, due.handler) == ("k", "due", "h"), "a due timer is picked, one not due is not"
    assert due.payload.replace(" ", "") == '{"n":1}' and '"id":-5' in due.origin.replace(" ", "")
    assert 1.5 < due.late < 30, f"late says how long after due_at it was picked: {due.late}"
    assert await storage.claim_due_timers(BOT, 10, LEASE) == [], "a picked timer is leased to its picker"
    assert await storage.claim_due_timers(BOT + 1, 10, 0) == [], "a bot picks only its own timers"
    assert await _fire(storage, due.id), "the fire's claim takes the timer"
    assert not await _fire(storage, due.id), "a timer fires once: a second claim finds it gone"


async def a_rolled_back_schedule_or_fire_changes_nothing(make: StorageFactory) -> None:
    storage = await make()
    try:
        async with storage.transaction() as tx:
            await tx.schedule(BOT, [_timer("k", "x", ago=1)])
            raise LookupError
    except LookupError:
        pass
    assert await storage.claim_due_timers(BOT, 10, LEASE) == [], "a rolled-back update schedules nothing"
    await _schedule(storage, _timer("k", "y", ago=1))
    [due] = await storage.claim_due_timers(BOT, 10, LEASE)
    try:
        async with storage.transaction() as tx:
            assert await tx.claim_timer(BOT, due.id)
            raise LookupError
    except LookupError:
        pass
    assert await _fire(storage, due.id), "a rolled-back fire leaves its timer to fire again"


async def concurrent_fires_of_one_timer_let_one_through(make: StorageFactory) -> None:
    storage = await make()
    await _schedule(storage, _timer("k", "x", ago=1))
    [due] = await storage.claim_due_timers(BOT, 10, LEASE)
    results = await asyncio.gather(*(_fire(storage, due.id, hold=0.05) for _ in range(4)))
    assert sorted(results) == [False, False, False, True], f"exactly one fire commits: {results}"


async def rescheduling_replaces_and_cancelling_removes(make: StorageFactory) -> None:
    storage = await make()
    await _schedule(storage, _timer("k", "x", ago=1, payload="1"))
    [old] = await storage.claim_due_timers(BOT, 10, LEASE)
    await _schedule(storage, _timer("k", "x", ago=1, payload="2"))
    assert not await _fire(storage, old.id), "a replaced timer's old version can no longer be fired"
    [new] = await storage.claim_due_timers(BOT, 10, LEASE)
    assert new.payload == "2" and new.id != old.id, "the replacement is due by its own time, with a new id"
    await _schedule(storage, TimerChange("k", "x"))
    assert not await _fire(storage, new.id), "a cancelled timer is gone"
    async with storage.transaction() as tx:
        await tx.schedule(BOT, [_timer("k", "y", ago=1), TimerChange("k", "y")])
    assert await storage.claim_due_timers(BOT, 10, 0) == [], (
        "changes apply in order: scheduled, then cancelled"
    )


async def a_keys_timers_fire_in_order(make: StorageFactory) -> None:
    storage = await make()
    await _schedule(storage, _timer("k", "2nd", ago=1), _timer("k", "1st", ago=3), _timer("j", "j", ago=2))
    due = await storage.claim_due_timers(BOT, 10, LEASE)
    assert _names(due) == ["1st", "j"], f"only each key's earliest, earliest first: {_names(due)}"
    assert await storage.claim_due_timers(BOT, 10, LEASE) == [], "a key's later timers wait for its earliest"
    assert await _fire(storage, due[0].id)
    assert _names(await storage.claim_due_timers(BOT, 10, LEASE)) == ["2nd"], "and follow once it fired"


async def a_lease_runs_out_and_a_failed_timer_stays_put(make: StorageFactory) -> None:
    storage = await make()
    await _schedule(storage, _timer("k", "x", ago=1), _timer("j", "y", ago=1))
    _, y = await storage.claim_due_timers(BOT, 10, 0.2)
    await asyncio.sleep(0.3)
    assert _names(await storage.claim_due_timers(BOT, 1, LEASE)) == ["x"], "a lapsed lease frees a timer"
    await storage.fail_timer(y.id, "ZeroDivisionError: division by zero")
    await asyncio.sleep(0.3)
    assert await storage.claim_due_timers(BOT, 10, LEASE) == [], "a failed timer is never picked again"
    assert not await _fire(storage, y.id), "nor fired"
    await _schedule(storage, _timer("j", "y", ago=1))
    assert _names(await storage.claim_due_timers(BOT, 10, LEASE)) == ["y"], "scheduling its name anew does"


TIMER_CHECKS: list[Check] = [
    a_timer_fires_once_when_due,
    a_rolled_back_schedule_or_fire_changes_nothing,
    concurrent_fires_of_one_timer_let_one_through,
    rescheduling_replaces_and_cancelling_removes,
    a_keys_timers_fire_in_order,
    a_lease_runs_out_and_a_failed_timer_stays_put,
]
