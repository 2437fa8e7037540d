"""Shared fixtures: a real PostgreSQL, a fresh migrated database per test, a fake Bot API server.

PostgreSQL: TEST_DATABASE_URL (or DATABASE_URL) when set, else a throwaway embedded server started here
and deleted at the end, so the suite needs nothing installed. Each test gets its own database, copied
from a template migrated once per run (a copy takes a few milliseconds; migrating takes longer).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from bot.app import create_app
from bot.config import Settings
from bot.dispatch import Bot
from bot.embedded import EmbeddedPostgres
from bot.migrate import migrate
from bot.storage import Storage
from bot.storage.memory import MemoryStorage
from bot.storage.postgres import PostgresStorage
from bot.testing.env import USERNAME, bot_env
from bot.testing.fake_telegram import FakeTelegram, serve
from bot.testing.pgbouncer import PgBouncer, pgbouncer_binary
from bot.testing.processes import BotProcess

TEMPLATE = "bot_test_template"
T = TypeVar("T")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


# --- PostgreSQL -------------------------------------------------------------------------------------


def with_database(url: str, database: str) -> str:
    """The same server URL (user, host, sslmode...), another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


class ExternalCluster:
    """A server given by URL: usable, but not ours to restart."""

    def __init__(self, url: str) -> None:
        self.url = url

    def dsn(self, database: str = "postgres") -> str:
        return with_database(self.url, database)


Cluster = EmbeddedPostgres | ExternalCluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """The server every database test uses; `.dsn(name)` addresses any database on it."""
    url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if url:
        yield ExternalCluster(url)
        return
    server = EmbeddedPostgres.throwaway()
    try:
        yield server
    finally:
        server.stop()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even where an event loop is already running
    (an async fixture asking for a sync one)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _execute(cluster: Cluster, query: str) -> None:
    # Through the maintenance database: CREATE/DROP DATABASE can't run connected to their target.
    conn = await asyncpg.connect(cluster.dsn("postgres"))
    try:
        await conn.execute(query)
    finally:
        await conn.close()


def _admin(cluster: Cluster, query: str) -> None:
    _run(_execute(cluster, query))


@pytest.fixture(scope="session")
def _template(pg_cluster: Cluster) -> Iterator[str]:
    """Migrated once per run; copying it (tens of ms) is faster than migrating each database."""
    _admin(pg_cluster, f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")  # a crashed run's leftover
    _admin(pg_cluster, f"CREATE DATABASE {TEMPLATE}")
    try:
        _run(migrate(pg_cluster.dsn(TEMPLATE)))
        yield TEMPLATE
    finally:
        _admin(pg_cluster, f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")


def _fresh_database(cluster: Cluster, template: str) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    # CREATE DATABASE waits (up to 5 s) for the template's last connections to go; nobody else uses it.
    _admin(cluster, f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield cluster.dsn(name)
    finally:
        # FORCE: a test that leaked a connection must not make the next one fail.
        _admin(cluster, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database_url(pg_cluster: Cluster, _template: str) -> Iterator[str]:
    """A fresh database with every migration applied, dropped after the test."""
    yield from _fresh_database(pg_cluster, _template)


@pytest.fixture
def empty_database_url(pg_cluster: Cluster) -> Iterator[str]:
    """A fresh database with nothing in it, for migration tests."""
    yield from _fresh_database(pg_cluster, "template0")


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


# --- Storages and the app ---------------------------------------------------------------------------


@asynccontextmanager
async def _storage(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    if kind == "memory":
        yield MemoryStorage()
        return
    postgres = await PostgresStorage.connect(request.getfixturevalue("database_url"), max_size=20)
    try:
        yield postgres
    finally:
        await postgres.close()


@pytest.fixture(params=["memory", "postgres"])
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    """Each storage in turn: tests using it prove a promise of the Storage protocol on both."""
    async with _storage(request.param, request) as storage:
        yield storage


@pytest.fixture(params=["memory", "postgres-locked", "postgres-optimistic"])
async def storage_mode(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Storage, bool]]:
    """Each storage and, for PostgreSQL, each transaction mode (DB_CONCURRENCY): (storage, optimistic)."""
    kind, _, mode = request.param.partition("-")
    async with _storage(kind, request) as storage:
        yield storage, mode == "optimistic"


@asynccontextmanager
async def _asgi_client(
    settings: Settings, bot: Bot[Any] | None = None, storage: Storage | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, bot=bot, storage=storage)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bot") as c,
    ):
        yield c


@pytest.fixture
def open_client() -> Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]:
    """`async with open_client(settings, bot=None, storage=None) as client`: the app in process, lifespan
    and all (no bot: the one the APP setting names; no storage: PostgreSQL at DATABASE_URL)."""
    return _asgi_client


# --- The fake Bot API ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _fake_server() -> Iterator[tuple[FakeTelegram, str]]:
    fake = FakeTelegram(username=USERNAME)
    with serve(fake) as root:
        yield fake, root


@pytest.fixture
def fake(_fake_server: tuple[FakeTelegram, str]) -> FakeTelegram:
    """The fake Bot API, emptied for each test."""
    fake = _fake_server[0]
    fake.reset()
    return fake


@pytest.fixture
def telegram_root(fake: FakeTelegram, _fake_server: tuple[FakeTelegram, str]) -> str:
    """TELEGRAM_API_ROOT for a bot that talks to the fake."""
    return _fake_server[1]


# --- Bot processes ---------------------------------------------------------------------------------


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
