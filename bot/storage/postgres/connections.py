"""Connections for update transactions, handed out in the order they were asked for.

asyncpg's pool hands its connections out through an `asyncio.LifoQueue`, and `asyncio.Queue.get` lets
a newcomer barge: a connection given back wakes the longest waiter, but a request arriving before that
waiter runs takes the connection, and the waiter, finding the queue empty, queues again at the back.
Under load (more updates in flight than connections, as with Telegram's 40 connections against the
default pool of 10) a few updates lose that race again and again: workload T measured (bench/run.py,
a probe timing `Pool._acquire`) a p50 wait of 10 ms and a p99 of 179 ms, most of the bot's p99. A
semaphore of the pool's size in front of it takes the wait out of the pool: asyncio's hands a permit
given back straight to the longest waiter and queues a newcomer behind the waiters, so every update
waits its turn and none waits several (tests/test_connections.py).

Each connection taken is kept with the task that took it, so that one held by an attempt that ignores
its deadline (a handler that swallowed the cancellation, running for good) can be taken back from
outside that task (`reclaim`): otherwise a few of them hold every connection and each chat gets 503 for
as long as they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg

from ...deadline import Deadlines
from ...metrics import Metrics
from .statements import unavailable_on_failure

__all__ = ["Connections"]

_RECLAIMED: Any = object()  # (`give_back`: a connection no longer in `_held`, taken back by `reclaim`)


class Connections:
    """The pool's connections, first come first served (see the module's docstring), each wait bounded
    by `wait_limit` and observed in `pool_wait`. Other users of the pool (the outbox sender, timers,
    maintenance) take theirs from the pool directly: at worst a permit holder then waits in the pool."""

    def __init__(self, pool: asyncpg.Pool, wait_limit: float, metrics: Metrics | None) -> None:
        self._pool = pool
        self._wait_limit = wait_limit
        self._metrics = metrics
        self._turns = asyncio.Semaphore(pool.get_max_size())
        # Each connection taken and not given back -> the task that took it (`reclaim`).
        self._held: dict[asyncpg.pool.PoolConnectionProxy, asyncio.Task[Any] | None] = {}
        # Every wait's limit, on one timer (`bot.deadline`): an asyncio.timeout per call armed and
        # cancelled a timer of its own (asyncio.wait_for before it, a task per call, was ~2% of a
        # request's CPU in py-spy on workload T), and telling the waits from the free cases first
        # took a scan of the whole pool.
        self._deadlines = Deadlines()

    async def take(self) -> asyncpg.pool.PoolConnectionProxy:
        """A transaction's connection (StorageUnavailable when none comes in time); `give_back` it."""
        # The wait is timed with perf_counter: uvloop's loop.time() (the deadline's clock) counts whole
        # milliseconds, too coarse for bot_pool_wait_seconds' first buckets.
        started = time.perf_counter()
        with (
            unavailable_on_failure("acquire a connection"),
            self._deadlines.within(asyncio.get_running_loop().time() + self._wait_limit),
        ):
            await self._turns.acquire()
            try:
                conn: asyncpg.pool.PoolConnectionProxy = await self._pool.acquire()
            except BaseException:
                self._turns.release()
                raise
        self._held[conn] = asyncio.current_task()
        if self._metrics is not None:
            self._metrics.pool_wait.observe(time.perf_counter() - started)
        return conn

    async def give_back(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        """Never raises: a connection broken mid-transaction fails its reset here and is terminated by
        the pool, not reused; that failure says nothing about the transaction's outcome.

        The turn is passed on first: the next update wakes while asyncpg's release (a task of its own)
        puts the connection back, and waits for it in the pool, first in line among turn holders. After
        the release instead, the connection sat idle for a turn of the event loop more, which under load
        is many requests' work. The release (waiting out a cancelled statement, a rollback) is bounded by
        the wait limit, as the next update's wait is.

        A connection taken back meanwhile (`reclaim`) was given back then: nothing is given twice."""
        if self._held.pop(conn, _RECLAIMED) is _RECLAIMED:
            return
        self._turns.release()
        with contextlib.suppress(Exception):
            await self._pool.release(conn, timeout=self._wait_limit)

    def reclaim(self, task: asyncio.Task[Any]) -> int:
        """Close the connections `task` holds and give their turns back, from outside it; how many.

        For an attempt that outlived its deadline and ignores its cancellation: it would hold them, an
        open transaction and its row locks for as long as it runs. Closing the socket ends the server's
        session, which rolls the transaction back and frees its locks (nothing of it half-committed: a
        COMMIT under way either happened or did not, as with any lost connection, and the update's claim
        tells which). asyncpg gives a closed connection's place back to the pool at once (its
        `Connection.terminate` releases the pool's holder and detaches the proxy), and the next to take it
        connects afresh. The task's next statement on it then fails (`InterfaceError`: the proxy is
        released, it can never reach the next connection in that place), StorageUnavailable for the
        update, and its `give_back` finds nothing to give."""
        taken = [conn for conn, holder in self._held.items() if holder is task]
        for conn in taken:
            del self._held[conn]
            self._turns.release()
            # (Already closed by the server, idle_in_transaction_session_timeout: its place was given
            # back then, and the detached proxy refuses every call.)
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
        return len(taken)
