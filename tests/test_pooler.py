"""Knowing a transaction-mode pooler: from the URL, from the server, and from the first statement it breaks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from bot.pooler import NO_STATEMENT_CACHE, broken_prepared_statement, pools_transactions, transaction_pooler
from bot.storage import RunAgain, StorageUnavailable, StoredSession
from bot.storage.postgres import PostgresStorage
from bot.testing.pgbouncer import PgBouncer


@pytest.mark.parametrize(
    ("dsn", "pooled"),
    [
        ("postgresql://u:p@ep-cool-name-123456-pooler.us-east-2.aws.neon.tech/db", True),  # Neon, pooled
        ("postgresql://u:p@ep-cool-name-123456.us-east-2.aws.neon.tech/db", False),  # Neon, direct
        (
            "postgresql://u:p@aws-0-eu-west-1.pooler.supabase.com:6543/postgres",
            True,
        ),  # Supavisor, transaction
        ("postgresql://u:p@aws-0-eu-west-1.pooler.supabase.com:5432/postgres", False),  # Supavisor, session
        ("postgresql://u:p@db.abcdefgh.supabase.co:6543/postgres", True),  # Supabase's PgBouncer
        ("postgresql://u:p@db.abcdefgh.supabase.co:5432/postgres", False),  # Supabase, direct
        ("postgresql://u:p@localhost:6432/bot", True),  # PgBouncer's default port
        # Anything else could be either: the server is asked.
        ("postgres://u:p@ec2-1-2-3-4.compute-1.amazonaws.com:5432/d1", None),  # Heroku, direct
        ("postgresql://u:p@db-pg-fra1-1-do-user-1-0.b.db.ondigitalocean.com:25061/pool", None),  # a pool
        ("postgresql://u@localhost:6434/bot", None),
        ("postgresql://postgres@/bot?host=/run/postgresql", None),  # a Unix socket
    ],
)
def test_auto_recognises_known_urls_and_leaves_the_others_to_the_server(
    dsn: str, pooled: bool | None
) -> None:
    assert transaction_pooler(dsn) is pooled


def test_an_explicit_mode_overrides_the_guess() -> None:
    assert transaction_pooler("postgresql://u@localhost:5432/bot", "transaction")
    assert transaction_pooler("postgresql://u@localhost:6432/bot", "none") is False
    assert transaction_pooler("postgresql://u@localhost:6434/bot", "none") is False


def test_a_broken_prepared_statement_is_found_under_what_it_was_raised_as() -> None:
    broken = asyncpg.InvalidSQLStatementNameError('prepared statement "__asyncpg_stmt_8__" does not exist')
    wrapped = StorageUnavailable("apply the update")
    wrapped.__cause__ = broken  # raise ... from broken
    assert broken_prepared_statement(wrapped) is broken
    assert broken_prepared_statement(StorageUnavailable("lock timeout")) is None
    assert broken_prepared_statement(asyncpg.DuplicatePreparedStatementError("exists")) is not None


@pytest.fixture
def session_pooler(pg_cluster: Any) -> Iterator[PgBouncer]:
    """PgBouncer in session mode: one server session per client for as long as it stays."""
    with PgBouncer(
        pg_cluster.dsn(), run_as=getattr(pg_cluster, "system_user", None), pool_mode="session"
    ) as bouncer:
        yield bouncer


@pytest.mark.anyio
async def test_the_server_and_a_session_pooler_are_told_from_a_transaction_pooler(
    database_url: str, pooled_database_url: str, session_pooler: PgBouncer
) -> None:
    for url, pooled in (
        (database_url, False),
        (pooled_database_url, True),
        (session_pooler.pooled(database_url), False),  # named statements work there: nothing to change
    ):
        assert await pools_transactions(lambda url=url: asyncpg.connect(url, **NO_STATEMENT_CACHE)) is pooled


@pytest.mark.anyio
async def test_auto_starts_in_pooler_mode_behind_a_pooler_on_a_port_it_does_not_know(
    database_url: str, pooled_database_url: str
) -> None:
    for url, pooled in ((database_url, False), (pooled_database_url, True)):
        storage = await PostgresStorage.connect(url, pooler="auto")
        try:
            assert storage.pooler_mode is pooled
        finally:
            await storage.close()


@pytest.fixture
async def misled(pooled_database_url: str) -> AsyncIterator[PostgresStorage]:
    """A storage told DB_POOLER=none through PgBouncer in transaction mode."""
    storage = await PostgresStorage.connect(pooled_database_url, pooler="none")
    assert not storage.pooler_mode
    try:
        yield storage
    finally:
        await storage.close()


async def apply(storage: PostgresStorage, update_id: int) -> None:
    async with storage.transaction() as tx:
        assert await tx.claim_update(1, update_id)
        await tx.read("chat")
        await tx.write("chat", StoredSession(f'{{"n": {update_id}}}'))


@pytest.mark.anyio
async def test_an_update_a_pooler_broke_is_run_again_in_pooler_mode_with_one_warning(
    misled: PostgresStorage, database_url: str, pgbouncer: PgBouncer, caplog: pytest.LogCaptureFixture
) -> None:
    await apply(misled, 1)  # its statements are prepared on the server session it ran on
    async with pgbouncer.holding_a_server_session(database_url):
        # ... which is busy now: the next update runs on another, where they do not exist.
        with pytest.raises(RunAgain):  # what the pipeline runs again at once, instead of answering 503
            await apply(misled, 2)
        assert misled.pooler_mode
        await apply(misled, 2)  # nothing of the first attempt stayed: claimed afresh, and applied
        await apply(misled, 3)
    session = await misled.peek("chat")
    assert session is not None and session.data == '{"n": 3}'
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "prepared statements fail (InvalidSQLStatementNameError: " in warnings[0]
    assert "set DB_POOLER=transaction" in warnings[0]
    assert "\n" not in warnings[0]


@pytest.mark.anyio
async def test_a_statement_outside_an_update_that_a_pooler_broke_is_sent_again_at_once(
    misled: PostgresStorage, database_url: str, pgbouncer: PgBouncer
) -> None:
    # Outside a transaction (the outbox's statements, the readiness check's): refused, the pool
    # switched, and sent again, so the caller sees it succeed.
    assert await misled.latest_update_id(1) is None
    async with pgbouncer.holding_a_server_session(database_url):
        assert await misled.latest_update_id(1) is None
    assert misled.pooler_mode
