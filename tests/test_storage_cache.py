"""The optimistic transaction's memory and turns, without a database."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from bot.storage import StoredSession
from bot.storage import cache as cache_module
from bot.storage.cache import SessionCache, Turns

pytestmark = pytest.mark.anyio


class Clock:
    """`Turns`'s clock, moved by hand: a test of when a key becomes stuck then holds however late the event
    loop runs it (with real sleeps, 50 ms of lag on a busy machine failed them)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    # The module's `time` only: asyncio's own clock stays the real one.
    monkeypatch.setattr(cache_module, "time", SimpleNamespace(monotonic=clock))
    return clock


def test_the_least_recently_used_session_is_forgotten_first() -> None:
    cache = SessionCache(size=2)
    cache.put("a", StoredSession("1"), "100")
    cache.put("b", StoredSession("2"), "101")
    assert cache.get("a") is not None  # now b is the least recently used
    cache.put("c", StoredSession("3"), "102")
    assert cache.get("b") is None
    entry = cache.get("a")
    assert entry is not None and (entry.session, entry.revision) == (StoredSession("1"), "100")
    assert len(cache) == 2


def test_nothing_is_remembered_past_its_age_or_with_size_zero() -> None:
    aged = SessionCache(size=10, max_age=0.0)
    aged.put("a", StoredSession("1"), "100")
    assert aged.get("a") is None
    off = SessionCache(size=0)
    off.put("a", StoredSession("1"), "100")
    assert off.get("a") is None and len(off) == 0


def test_a_write_makes_what_is_remembered_stale_and_is_seen_from_any_earlier_point() -> None:
    cache = SessionCache(size=0)  # (the writes are kept whatever the size: SESSION_CACHE=0 too)
    before = cache.clock
    cache.wrote("other")
    assert not cache.written_since("a", before)
    cache.wrote("a")
    assert cache.written_since("a", before)
    assert not cache.written_since("a", cache.clock)
    remembering = SessionCache(size=10)
    remembering.put("a", StoredSession("1"), "100")
    remembering.wrote("a")
    assert remembering.get("a") is None


def test_writes_kept_are_bounded_and_a_point_older_than_them_answers_maybe() -> None:
    cache = SessionCache(size=10)
    cache.wrote("a")
    after_a = cache.clock
    for n in range(SessionCache.WRITES - 1):
        cache.wrote(f"k{n}")
    assert not cache.written_since("a", after_a)  # still told apart: WRITES - 1 writes back
    cache.wrote("b")
    assert len(cache._written) == SessionCache.WRITES  # "a" dropped
    assert cache.written_since("a", after_a)  # too far back to know: read it again
    assert not cache.written_since("a", cache.clock)


async def test_turns_are_taken_in_arrival_order_and_a_free_key_keeps_no_state() -> None:
    turns, order = Turns(), []

    async def holder(n: int) -> None:
        await turns.take("k")
        order.append(n)
        await asyncio.sleep(0)
        turns.give_back("k")

    await asyncio.gather(*(holder(n) for n in range(5)))
    assert order == [0, 1, 2, 3, 4]
    assert not turns.busy("k")


async def test_a_waiter_cancelled_as_it_is_handed_the_turn_passes_it_on() -> None:
    turns = Turns()
    await turns.take("k")
    cancelled = asyncio.create_task(turns.take("k"))
    after = asyncio.create_task(turns.take("k"))
    await asyncio.sleep(0)
    turns.give_back("k")  # the turn goes to `cancelled`...
    cancelled.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.wait_for(after, 1)  # and the next in line has it
    turns.give_back("k")
    assert not turns.busy("k")


async def test_a_waiter_cancelled_while_waiting_leaves_the_line() -> None:
    turns = Turns()
    await turns.take("k")
    waiting = asyncio.create_task(turns.take("k"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    turns.give_back("k")
    assert not turns.busy("k")


async def test_a_turn_held_past_stuck_after_is_stuck_and_each_holder_gets_the_time_afresh(
    clock: Clock,
) -> None:
    turns = Turns(stuck_after=0.2)
    await turns.take("k")
    assert not turns.stuck("k")
    waiting = asyncio.create_task(turns.take("k"))
    await asyncio.sleep(0)
    clock.now += 0.1
    turns.give_back("k")
    assert await asyncio.wait_for(waiting, 1)
    clock.now += 0.15  # the first holder got its turn 0.25 s ago, this one 0.15 s ago
    assert not turns.stuck("k")  # the next holder's own time
    clock.now += 0.1
    assert turns.stuck("k")  # its holder ignored every deadline: nobody else should queue behind it
    turns.give_back("k")
    assert not turns.busy("k") and not turns.stuck("k")


async def test_waiters_queued_before_a_turn_is_stuck_stop_waiting_when_it_becomes_stuck() -> None:
    """Before, each waited for the stuck holder until its own deadline: one more 503 each, although the
    update would have run with locks had it come a moment later. The holder of the time counts: a waiter
    queued behind a turn handed on waits for that holder's own `stuck_after`."""
    # On the real clock (the watch that lets the waiters go is a loop timer), with room for a late loop:
    # the check below fails only if it runs 0.2 s later than asked.
    turns = Turns(stuck_after=0.4)
    await turns.take("k")
    first = asyncio.create_task(turns.take("k"))
    await asyncio.sleep(0.3)
    turns.give_back("k")  # handed on to `first` at 0.3 s: stuck at 0.7 s
    assert await asyncio.wait_for(first, 1)
    waiting = [asyncio.create_task(turns.take("k")) for _ in range(2)]
    await asyncio.sleep(0.2)
    assert not any(w.done() for w in waiting)  # (0.5 s: the first holder's time is past, not this one's)
    assert await asyncio.wait_for(asyncio.gather(*waiting), 1) == [False, False]  # let go, nothing taken
    assert turns.stuck("k")
    turns.give_back("k")
    assert not turns.busy("k")  # the waiters took nothing: the holder's was the last turn


async def test_with_two_holders_a_third_waits_and_the_key_is_stuck_only_when_both_turns_are(
    clock: Clock,
) -> None:
    turns = Turns(stuck_after=0.2, holders=2)
    await turns.take("k")
    clock.now += 0.25  # the first holder is past stuck_after...
    assert turns.take_free("k")  # ...but the second turn is free, and taken now
    assert not turns.stuck("k")  # the second holder's time is its own
    third = asyncio.create_task(turns.take("k"))
    await asyncio.sleep(0)
    assert not third.done()  # both turns held: the third waits
    turns.give_back("k")
    await asyncio.wait_for(third, 1)  # a turn handed on: still two holders
    assert not turns.take_free("k")
    clock.now += 0.25
    assert turns.stuck("k")  # every turn held past stuck_after
    turns.give_back("k")
    assert not turns.stuck("k")  # one turn free again
    turns.give_back("k")
    assert not turns.busy("k")  # a free key keeps no state
