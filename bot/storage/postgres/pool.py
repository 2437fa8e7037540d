"""The connection pool and the pooler: opening the pool (DB_POOLER, and asking the server when `auto`
does not know the URL), switching to pooler mode when a transaction-mode pooler breaks a prepared
statement nobody told us about, and running statements on any pooled connection outside an update's
transaction (`Pooled`, which every query family of the storage builds on)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from ...pooler import NO_STATEMENT_CACHE, broken_prepared_statement, pools_transactions, transaction_pooler
from .. import RunAgain, StorageUnavailable
from .statements import unavailable_on_failure

__all__ = ["Pooled", "create_pool"]

log = logging.getLogger("bot.storage")
T = TypeVar("T")


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    connect_timeout: float,
    application_name: str,
    pooler: str,
) -> tuple[asyncpg.Pool, dict[str, Any]]:
    """The pool, and the connection arguments it was opened with (`Pooled` reopens it with them)."""
    connect_kwargs: dict[str, Any] = {
        "timeout": connect_timeout,
        # application_name (naming the bot in pg_stat_activity) is one of the few startup
        # parameters PgBouncer passes on; the timeouts are set inside each transaction instead.
        "server_settings": {"application_name": application_name},
    }
    with unavailable_on_failure("connect to the database"):
        pooled = transaction_pooler(dsn, pooler)
        if pooled is None:
            pooled = await _asks_the_server(dsn, connect_kwargs)
        if pooled:
            connect_kwargs.update(NO_STATEMENT_CACHE)
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            # Stale connections (a database restart, a failover) are replaced, not handed out.
            max_inactive_connection_lifetime=60.0,
            reset=_keep_session,
            **connect_kwargs,
        )
    return pool, connect_kwargs


async def _asks_the_server(dsn: str, connect_kwargs: dict[str, Any]) -> bool:
    """DB_POOLER=auto with a URL it does not know: whether a transaction-mode pooler answers there
    (bot.pooler), asked on connections of their own that keep no named statement (a pooler's server
    session may hold another client's)."""
    pooled = await pools_transactions(lambda: asyncpg.connect(dsn, **connect_kwargs, **NO_STATEMENT_CACHE))
    if pooled:
        log.info(
            "DATABASE_URL goes through a connection pooler in transaction mode: no prepared statements are"
            " kept on the server, as with DB_POOLER=transaction"
        )
    return pooled


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset on release: this storage never LISTENs, SETs, holds cursors or advisory locks
    (nothing survives a transaction, as PgBouncer's transaction mode requires), and an open transaction
    is rolled back by the pool before this runs. asyncpg's default reset is one more round trip per
    update (`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`)."""


class Pooled:
    """The pool (owned: closed with the storage) and statements on any of its connections."""

    def __init__(
        self, pool: asyncpg.Pool, *, dsn: str, connect_kwargs: dict[str, Any], acquire_timeout: float
    ) -> None:
        """`pool` connects to `dsn` with `connect_kwargs`; with `NO_STATEMENT_CACHE` among them, in
        pooler mode already."""
        self._pool = pool
        # To reconnect the pool in pooler mode (`run_again_if_pooler_broke`).
        self._dsn, self._connect_kwargs = dsn, connect_kwargs
        self._pooler_mode = connect_kwargs.get("statement_cache_size") == 0
        self._acquire_timeout = acquire_timeout

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @property
    def acquire_timeout(self) -> float:
        return self._acquire_timeout

    @property
    def pooler_mode(self) -> bool:
        """No statement is cached on the server: DB_POOLER said so, or a pooler was found."""
        return self._pooler_mode

    async def run_again_if_pooler_broke(self, exc: BaseException) -> None:
        """Raise RunAgain when `exc` is a prepared statement broken by a transaction-mode pooler (then
        the pool is in pooler mode already: `_pooler_broke`)."""
        if await self._pooler_broke(exc):
            raise RunAgain("a pooler broke a prepared statement; now in pooler mode") from exc

    async def _pooler_broke(self, exc: BaseException) -> bool:
        """Whether `exc` is a prepared statement broken by a transaction-mode pooler that DB_POOLER did
        not name (or `auto` did not find). The first time, the pool switches to pooler mode: new
        connections keep no statement on the server, and the open ones are replaced as they come back
        (asyncpg's expiry). The failed statement never ran, so its work can be done again at once."""
        broken = broken_prepared_statement(exc)
        if broken is None:
            return False
        if not self._pooler_mode:
            self._pooler_mode = True
            self._connect_kwargs = {**self._connect_kwargs, **NO_STATEMENT_CACHE}
            self._pool.set_connect_args(self._dsn, **self._connect_kwargs)
            await self._pool.expire_connections()
            log.warning(
                "DATABASE_URL: prepared statements fail (%s: %s), as behind a pooler in transaction mode;"
                " switched to running without them: set DB_POOLER=transaction to start that way",
                type(broken).__name__,
                str(broken).partition("\n")[0],  # asyncpg adds a many-line hint
            )
        return True

    async def _on_pool(self, what: str, run: Callable[[], Awaitable[T]]) -> T:
        """Statements on any pooled connection, outside an update's transaction. One refused by a pooler
        for its prepared statement's name never ran: it is run once more, in pooler mode."""
        try:
            with unavailable_on_failure(what):
                return await run()
        except StorageUnavailable as exc:
            if not await self._pooler_broke(exc):
                raise
        with unavailable_on_failure(what):
            return await run()

    async def _execute(self, what: str, query: str, *args: Any) -> str:
        return await self._on_pool(
            what, lambda: self._pool.execute(query, *args, timeout=self._acquire_timeout * 2)
        )

    async def _fetch(self, what: str, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._on_pool(
            what, lambda: self._pool.fetch(query, *args, timeout=self._acquire_timeout * 2)
        )

    async def _fetchrow(self, what: str, query: str, *args: Any) -> asyncpg.Record | None:
        return await self._on_pool(
            what, lambda: self._pool.fetchrow(query, *args, timeout=self._acquire_timeout * 2)
        )

    async def _fetchval(self, what: str, query: str, *args: Any) -> Any:
        return await self._on_pool(
            what, lambda: self._pool.fetchval(query, *args, timeout=self._acquire_timeout * 2)
        )
