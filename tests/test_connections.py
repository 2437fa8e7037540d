"""Connections for update transactions come first come, first served, within their wait limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bot.storage import StorageUnavailable
from bot.storage.postgres.connections import Connections

pytestmark = pytest.mark.anyio


@pytest.fixture
async def one_connection(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        yield pool
    finally:
        await pool.close()


async def test_connections_are_handed_out_in_the_order_they_were_asked_for(
    one_connection: asyncpg.Pool,
) -> None:
    # A busy server in small: more updates than connections, each giving its connection back and asking
    # again at once. asyncpg's queue lets an update that asks while a connection is on its way to the
    # longest waiter take it; that waiter queues again at the back, and can be overtaken over and over.
    connections = Connections(one_connection, wait_limit=10.0, metrics=None)
    asked: list[int] = []
    granted: list[int] = []

    async def update(number: int) -> None:
        for turn in range(10):
            ticket = number * 100 + turn
            asked.append(ticket)
            conn = await connections.take()
            granted.append(ticket)
            await asyncio.sleep(0)  # the statement
            await connections.give_back(conn)
            for _ in range((number * 7 + turn * 3) % 5):  # the next update arrives a little later
                await asyncio.sleep(0)

    await asyncio.gather(*(update(n) for n in range(8)))
    assert len(granted) == 80
    assert granted == asked


async def test_a_wait_past_the_limit_is_storage_unavailable_and_gives_nothing_away(
    one_connection: asyncpg.Pool,
) -> None:
    connections = Connections(one_connection, wait_limit=0.2, metrics=None)
    held = await connections.take()
    with pytest.raises(StorageUnavailable, match="acquire a connection"):
        await connections.take()
    await connections.give_back(held)
    # The timed-out wait took no turn with it: the one connection is there for the next, twice over.
    for _ in range(2):
        conn = await asyncio.wait_for(connections.take(), 5)
        assert await conn.fetchval("SELECT 1") == 1
        await connections.give_back(conn)


async def test_a_wait_that_ends_in_the_pool_gives_its_turn_back(one_connection: asyncpg.Pool) -> None:
    # The outbox, timers and health checks take connections from the pool directly: an update can have
    # its turn and still find the pool empty, and time out there.
    connections = Connections(one_connection, wait_limit=0.2, metrics=None)
    outside = await one_connection.acquire()
    with pytest.raises(StorageUnavailable, match="acquire a connection"):
        await connections.take()
    await one_connection.release(outside)
    for _ in range(2):
        conn = await asyncio.wait_for(connections.take(), 5)
        await connections.give_back(conn)


async def test_a_cancelled_wait_gives_nothing_away(one_connection: asyncpg.Pool) -> None:
    connections = Connections(one_connection, wait_limit=10.0, metrics=None)
    held = await connections.take()
    waiter = asyncio.create_task(connections.take())
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await connections.give_back(held)
    conn = await asyncio.wait_for(connections.take(), 5)
    await connections.give_back(conn)


async def test_a_connection_taken_back_from_a_stuck_task_ends_its_transaction_and_is_given_back_once(
    one_connection: asyncpg.Pool,
) -> None:
    """`reclaim`: the connection a task holds in an open transaction, taken back from outside it (the task
    ignores cancellation). Its server session ends, rolling the transaction back; its place and its turn
    are the next taker's at once; the task's next statement fails, and its own give_back later gives
    nothing a second time."""
    connections = Connections(one_connection, wait_limit=0.3, metrics=None)
    began = asyncio.Event()
    resume = asyncio.Event()

    async def stuck() -> BaseException | None:
        conn = await connections.take()
        await conn.execute("BEGIN; SELECT pg_advisory_xact_lock(42)")  # (as a session row's lock)
        began.set()
        await resume.wait()
        try:
            await conn.execute("COMMIT")
        except asyncpg.InterfaceError as error:
            return error
        finally:
            await connections.give_back(conn)
        return None

    task = asyncio.create_task(stuck())
    await began.wait()
    assert connections.reclaim(asyncio.current_task()) == 0  # (only what the task given holds)
    assert connections.reclaim(task) == 1
    conn = await connections.take()  # no wait: the place and the turn are given back
    # Its transaction rolled back: the lock is free (once the server has seen the socket close).
    for _ in range(20):
        if await conn.fetchval("SELECT pg_try_advisory_xact_lock(42)"):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the stuck task's transaction still holds its lock")
    resume.set()
    error = await task
    assert isinstance(error, asyncpg.InterfaceError)  # released: never the new connection in its place
    assert connections._turns.locked()  # its give_back released no second turn: the one is still held
    await connections.give_back(conn)
