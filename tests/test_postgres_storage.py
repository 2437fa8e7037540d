"""What only the PostgreSQL storage has to get right: rows, locks and the pool, seen from SQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bot.storage import StorageUnavailable, StoredSession
from bot.storage.postgres import PostgresStorage

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["direct", "pgbouncer"])
async def postgres(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[PostgresStorage]:
    """The storage straight on PostgreSQL, and through PgBouncer in transaction mode, where the lock
    timeout can only work if it is set inside each transaction."""
    url, pooler = database_url, "none"
    if request.param == "pgbouncer":
        url, pooler = request.getfixturevalue("pooled_database_url"), "transaction"
    storage = await PostgresStorage.connect(url, lock_timeout=0.5, pooler=pooler)
    try:
        yield storage
    finally:
        await storage.close()


async def test_a_session_never_written_leaves_no_row(postgres: PostgresStorage) -> None:
    async with postgres.transaction() as tx:
        assert await tx.read("new-chat") is None  # locked through a placeholder row
    assert await postgres.pool.fetchval("SELECT count(*) FROM sessions") == 0


async def test_updates_that_touch_nothing_take_no_connection(postgres: PostgresStorage) -> None:
    idle_before = postgres.pool.get_idle_size()
    async with postgres.transaction():
        assert postgres.pool.get_idle_size() == idle_before


async def test_prune_skips_an_expired_row_that_is_locked_and_removes_it_later(
    postgres: PostgresStorage,
) -> None:
    async with postgres.transaction() as tx:
        await tx.read("brief")
        await tx.write("brief", StoredSession('{"n": 1}'), ttl=0.01)
    await asyncio.sleep(0.05)
    async with postgres.transaction() as tx:
        assert await tx.read("brief") is None  # expired, and now locked by us
        assert await asyncio.wait_for(postgres.prune(3600, 3600), timeout=2) == 0  # skipped, not waited on
    assert await postgres.prune(3600, 3600) == 1
    assert await postgres.pool.fetchval("SELECT count(*) FROM sessions") == 0


async def test_a_lock_held_past_lock_timeout_is_storage_unavailable(
    postgres: PostgresStorage, database_url: str
) -> None:
    async with postgres.transaction() as tx:
        await tx.read("k")
        await tx.write("k", StoredSession("{}"))
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM sessions WHERE key = 'k' FOR UPDATE")
            with pytest.raises(StorageUnavailable, match="LockNotAvailable"):
                async with postgres.transaction() as tx:
                    await tx.read("k")
    finally:
        await blocker.close()


async def test_an_unreachable_database_is_storage_unavailable() -> None:
    with pytest.raises(StorageUnavailable, match="connect to the database"):
        await PostgresStorage.connect("postgresql://nobody@127.0.0.1:9/none", connect_timeout=1)


async def test_old_update_ids_and_sent_replies_are_pruned(postgres: PostgresStorage) -> None:
    async with postgres.transaction() as tx:
        await tx.claim_update(1, 1)
    await postgres.pool.execute("UPDATE processed_updates SET processed_at = now() - interval '26 hours'")
    async with postgres.transaction() as tx:
        await tx.claim_update(1, 2)
    assert await postgres.prune(keep_updates=25 * 3600, keep_sent=3600) == 1
    assert await postgres.pool.fetchval("SELECT array_agg(update_id) FROM processed_updates") == [2]
