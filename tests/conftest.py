"""The project's own fixtures. The shared ones (a real PostgreSQL, a fresh migrated database per test, the
fake Bot API, both storages, the app in process) come from the package's pytest plugin,
`bot/testing/plugin.py`, which a bot's own tests get too."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from bot.storage import Storage
from bot.testing.env import bot_env
from bot.testing.pgbouncer import PgBouncer, pgbouncer_binary
from bot.testing.plugin import Cluster, open_storage
from bot.testing.processes import BotProcess


@pytest.fixture(scope="session")
def pgbouncer(pg_cluster: Cluster) -> Iterator[PgBouncer]:
    """PgBouncer 1.18 in transaction mode in front of the test server (.ci/run installs it)."""
    if pgbouncer_binary() is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)")
    with PgBouncer(pg_cluster.dsn(), run_as=getattr(pg_cluster, "system_user", None)) as bouncer:
        yield bouncer


@pytest.fixture
def pooled_database_url(database_url: str, pgbouncer: PgBouncer) -> str:
    """The fresh migrated database of `database_url`, reached through PgBouncer in transaction mode."""
    return pgbouncer.pooled(database_url)


@pytest.fixture(params=["direct", "pgbouncer"])
def direct_or_pooled_url(request: pytest.FixtureRequest, database_url: str) -> str:
    """The test's database, straight or through PgBouncer in transaction mode, which keeps nothing of a
    connection's between statements."""
    return database_url if request.param == "direct" else str(request.getfixturevalue("pooled_database_url"))


@pytest.fixture(params=["memory", "postgres-locked", "postgres-optimistic"])
async def storage_mode(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Storage, bool]]:
    """Each storage and, for PostgreSQL, each transaction mode (DB_CONCURRENCY): (storage, optimistic)."""
    kind, _, mode = request.param.partition("-")
    async with open_storage(kind, request) as storage:
        yield storage, mode == "optimistic"


@pytest.fixture
def serve_bot(database_url: str, telegram_root: str, tmp_path: Path) -> Iterator[Callable[..., BotProcess]]:
    """`serve_bot(**env)`: a ready `python -m bot serve` on this test's database and the fake Bot API,
    with the test's settings on top; killed at the end."""
    started: list[BotProcess] = []

    def start(**env: str) -> BotProcess:
        process = BotProcess(
            bot_env(database_url, telegram_root, **env), tmp_path / f"bot-{len(started)}.log"
        )
        started.append(process)
        process.wait_ready()
        return process

    yield start
    for process in started:
        process.close()
