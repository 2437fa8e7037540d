"""`PostgresStorage`, the facade the runtime holds: it opens the pool, hands out the two kinds of
transaction with what each needs (pool, timeouts, metrics; for the optimistic one, this process's
memory of sessions, turns and contended keys), commits or rolls them back, and carries the query
families built on the pool (the outbox sender's, the timers', maintenance and the playground's peeks)."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, TypeVar

import asyncpg

from ...metrics import Metrics
from ...migrate import NotMigrated, check_migrated
from .. import StorageUnavailable
from ..cache import Contended, SessionCache, Turns
from .batches import Batches
from .connections import Connections
from .locking import PostgresTransaction
from .maintenance import PostgresMaintenance
from .optimistic import OptimisticTransaction
from .outbox import PostgresOutbox
from .peeks import PostgresPeeks
from .pool import Pooled, create_pool
from .timers import PostgresTimers

__all__ = ["PostgresStorage"]

_Tx = TypeVar("_Tx", PostgresTransaction, OptimisticTransaction)


class _Finished(Generic[_Tx]):
    """Yields the transaction; commits it when the block ends, rolls it back when anything raised.

    What this process remembers of sessions outlives a failure: a remembered row version names its
    server too (`optimistic_sql.revision`), so one remembered from before a restore or a failover never matches.
    When a pooler broke a prepared statement, the storage switches to pooler mode and RunAgain asks
    for the update again. (A class, not an @asynccontextmanager: every update opens one, and the
    generator's machinery cost more than what it does.)"""

    def __init__(self, tx: _Tx, pooled: Pooled) -> None:
        self._tx: _Tx = tx
        self._pooled = pooled

    async def __aenter__(self) -> _Tx:
        return self._tx

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            # Rolling back on a broken connection fails too; the original error is the one to report,
            # and release() in finish() still returns (or discards) the connection.
            with contextlib.suppress(Exception):
                await self._tx.finish(commit=False)
            await self._pooled.run_again_if_pooler_broke(exc)
            return  # the original error goes on
        try:
            await self._tx.finish(commit=True)
        except StorageUnavailable as failure:
            await self._pooled.run_again_if_pooler_broke(failure)
            raise


class PostgresStorage(PostgresOutbox, PostgresTimers, PostgresMaintenance, PostgresPeeks):
    """Sessions, processed update ids, the outbox and timers in PostgreSQL. The pool is owned by this
    object."""

    # How long a session whose optimistic write lost a race is run with locks straight away: a hot chat
    # would otherwise run most of its updates twice.
    CONTENDED_FOR = 5.0
    # How long a session another process wrote since this one remembered it is read afresh for each of
    # its updates instead of taken from memory: a chat whose updates alternate between processes
    # (several instances, WEB_CONCURRENCY > 1) would otherwise have its memory refused, and its handlers
    # run twice, on nearly every update. A read costs the same round trips as that refusal did.
    SHARED_FOR = 60.0

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        dsn: str,
        connect_kwargs: dict[str, Any],
        acquire_timeout: float = 5.0,
        lock_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        metrics: Metrics | None = None,
        cache_size: int = 5000,
    ) -> None:
        """`pool` connects to `dsn` with `connect_kwargs`; with `NO_STATEMENT_CACHE` among them, in
        pooler mode already."""
        super().__init__(pool, dsn=dsn, connect_kwargs=connect_kwargs, acquire_timeout=acquire_timeout)
        self._metrics = metrics  # for the lock-wait and pool-wait histograms
        # The update transactions' connections, first come first served (bot.storage.postgres.connections).
        self.connections = Connections(pool, acquire_timeout, metrics)
        # Timeouts as SET LOCAL inside each transaction, sent in the same simple-query message as BEGIN:
        # no extra round trip, and nothing that depends on the session, which a transaction-mode pooler
        # does not keep (and whose startup parameters it refuses: "unsupported startup parameter").
        self._lock_timeout = f"{int(lock_timeout * 1000)}ms"  # the optimistic statement sets it itself
        self._begin = (
            f"BEGIN; SET LOCAL lock_timeout = '{self._lock_timeout}';"
            f" SET LOCAL statement_timeout = '{int(statement_timeout * 1000)}ms';"
            f" SET LOCAL idle_in_transaction_session_timeout = '{int(statement_timeout * 3000)}ms'"
        )
        # The optimistic transaction's memory of sessions, its per-key turns, the keys it leaves to the
        # lock for a while, and those it reads afresh for a while (bot.storage.cache).
        self.cache = SessionCache(cache_size)
        self.batches = Batches(self.connections, metrics)
        self.turns = Turns()  # (a turn held TURN_STUCK_AFTER is not waited for: its key runs with locks)
        self.contention = Contended(self.CONTENDED_FOR)
        self.shared = Contended(self.SHARED_FOR)

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        acquire_timeout: float = 5.0,
        lock_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        application_name: str = "bot",
        metrics: Metrics | None = None,
        pooler: str = "auto",
        cache_size: int = 5000,
    ) -> PostgresStorage:
        """Open a pool. Connections are made lazily after the first, so a database that is down at
        start-up is reported here, and one that goes away later is reconnected by the pool.

        `pooler` is DB_POOLER: behind a transaction-mode pooler no statement is cached on the server.
        With `auto` and a URL it does not know, one more connection asks the server (bot.pooler)."""
        pool, connect_kwargs = await create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            connect_timeout=connect_timeout,
            application_name=application_name,
            pooler=pooler,
        )
        return cls(
            pool,
            dsn=dsn,
            connect_kwargs=connect_kwargs,
            acquire_timeout=acquire_timeout,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
            metrics=metrics,
            cache_size=cache_size,
        )

    @property
    def metrics(self) -> Metrics | None:
        return self._metrics

    def contend(self, key: str) -> None:
        """Run `key`'s updates with locks for the next CONTENDED_FOR seconds."""
        self.contention.add(key)

    def contended(self, key: str) -> bool:
        return key in self.contention

    def transaction(self) -> AbstractAsyncContextManager[PostgresTransaction]:
        return _Finished(
            PostgresTransaction(self.connections, self._metrics, self._begin, self.cache.wrote),
            self,
        )

    def optimistic_transaction(self) -> AbstractAsyncContextManager[OptimisticTransaction]:
        return _Finished(
            OptimisticTransaction(
                self.connections,
                self.cache,
                self.turns,
                self.contention,
                self.shared,
                self._lock_timeout,
                self.batches,
            ),
            self,
        )

    def reclaim(self, task: asyncio.Task[Any]) -> int:
        return self.connections.reclaim(task)

    async def ping(self) -> None:
        async def check() -> None:
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                try:
                    await check_migrated(conn)
                except NotMigrated as exc:
                    raise StorageUnavailable(str(exc)) from exc

        await self._on_pool("ping", check)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout=10)
        except TimeoutError:
            self._pool.terminate()
