"""The test kit, as a pytest plugin: installing the package registers it (the `pytest11` entry point), so a
bot's own tests get these fixtures with no conftest.py to copy.

    fake              the fake Bot API (a real HTTP server, `bot.testing.fake_telegram`), emptied per test
    telegram_root     its URL, for TELEGRAM_API_ROOT
    database_url      a fresh, migrated PostgreSQL database per test, dropped after it
    memory_storage    a MemoryStorage
    postgres_storage  a PostgresStorage on `database_url`
    storage           each of the two in turn (the test runs once per storage)
    webhook           `async with webhook(bot) as hook`: the bot's app in process on the fake Bot API and
                      `storage` (or DATABASE_URL's PostgreSQL); `await hook.post(update)` answers as the
                      webhook does (`bot.testing.webhook_client`)
    open_client       `async with open_client(settings, bot, storage) as client`: the app behind httpx

PostgreSQL: TEST_DATABASE_URL (or DATABASE_URL) when set, else a throwaway embedded server (the package's
`local` extra) started on first use and deleted at the end, so nothing needs installing; it does not flush
to disk (fsync off). Each test's database is a copy of a template migrated once per run, made in the
background while the test before it runs and dropped while the test after it runs.

Async fixtures and tests run with anyio (`pytestmark = pytest.mark.anyio`), which comes with httpx, on
asyncio only (asyncpg and uvicorn are asyncio's): anyio would run each test on every backend installed,
trio too. A conftest.py's own `anyio_backend` still wins. Nothing else here runs unless a test asks for
it: a suite that does not use the plugin pays its import, which is the `bot` package's (about 0.2 s on
this project's 2-core machine; a bot's tests import the package anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import types
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest

if TYPE_CHECKING:  # imported by the fixtures that need them: loading the plugin stays cheap
    import httpx

    from ..dispatch import Bot
    from ..storage import Storage
    from ..storage.memory import MemoryStorage
    from ..storage.postgres import PostgresStorage
    from .fake_telegram import FakeTelegram
    from .webhook_client import WebhookClient

__all__ = ["Cluster", "ExternalCluster", "OpenWebhook", "open_storage", "with_database"]

# One per run: two runs on one server (a bot's tests started from this suite, two checkouts sharing
# TEST_DATABASE_URL) must not drop each other's template.
TEMPLATE = f"bot_test_template_{os.getpid()}"
T = TypeVar("T")


@pytest.fixture(scope="session", name="anyio_backend")
def _on_asyncio() -> str:
    return "asyncio"


def pytest_configure(config: pytest.Config) -> None:
    # Registered again now, after every plugin of an entry point (anyio's among them), so that it is the
    # one a test gets: of two plugins' fixtures of one name, the one registered last wins.
    # (A module: pytest looks fixtures up on a module, or on an object's class.)
    late = types.ModuleType(f"{__name__}.asyncio")
    late.anyio_backend = _on_asyncio  # type: ignore[attr-defined]
    config.pluginmanager.register(late, late.__name__)


# --- PostgreSQL -------------------------------------------------------------------------------------


def with_database(url: str, database: str) -> str:
    """The same server URL (user, host, sslmode...), another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


class Cluster(Protocol):
    def dsn(self, database: str = "postgres") -> str:
        """A URL of a database on this server."""


class ExternalCluster:
    """A server given by URL: usable, but not ours to restart."""

    def __init__(self, url: str) -> None:
        self.url = url

    def dsn(self, database: str = "postgres") -> str:
        return with_database(self.url, database)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """The server every database test uses; `.dsn(name)` addresses any database on it."""
    url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if url:
        yield ExternalCluster(url)
        return
    from ..embedded import EmbeddedPostgres

    server = EmbeddedPostgres.throwaway()
    try:
        # No flush to disk: what it guards against, the machine itself crashing, ends a throwaway server's
        # run anyway, while a process killed (a backend, the bot, the server) loses no more than with it.
        # Flushing was much of each test's database copy and drop, and of every commit.
        _admin(server, "ALTER SYSTEM SET fsync = off")
        _admin(server, "SELECT pg_reload_conf()")
        yield server
    finally:
        server.stop()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even where an event loop is already running
    (an async fixture asking for a sync one)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _admin(cluster: Cluster, query: str) -> None:
    import asyncpg

    async def execute() -> None:
        # Through the maintenance database: CREATE/DROP DATABASE can't run connected to their target.
        conn = await asyncpg.connect(cluster.dsn("postgres"))
        try:
            await conn.execute(query)
        finally:
            await conn.close()

    _run(execute())


@pytest.fixture(scope="session")
def _bot_template(pg_cluster: Cluster) -> Iterator[str]:
    """Migrated once per run; copying it (tens of ms) is faster than migrating each database."""
    from ..migrate import migrate

    _admin(pg_cluster, f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")  # a crashed run's leftover
    _admin(pg_cluster, f"CREATE DATABASE {TEMPLATE}")
    try:
        _run(migrate(pg_cluster.dsn(TEMPLATE)))
        yield TEMPLATE
    finally:
        _admin(pg_cluster, f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")


def _create_database(cluster: Cluster, template: str, strategy: str = "") -> str:
    name = f"test_{uuid.uuid4().hex[:12]}"
    # CREATE DATABASE waits (up to 5 s) for the template's last connections to go; nobody else uses it.
    _admin(cluster, f"CREATE DATABASE {name} TEMPLATE {template}{strategy}")
    return name


def _drop_database(cluster: Cluster, name: str) -> None:
    # FORCE: a test that leaked a connection must not make the next one fail.
    _admin(cluster, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _fresh_database(cluster: Cluster, template: str) -> Iterator[str]:
    name = _create_database(cluster, template)
    try:
        yield cluster.dsn(name)
    finally:
        _drop_database(cluster, name)


class _Copies:
    """Copies of the migrated template, each made while the test before it runs and dropped while the test
    after it runs: a copy and a drop (tenths of a second together) were paid in every database test's own
    time. A copy made ahead is the template as it is, as one made on demand would be."""

    def __init__(self, cluster: Cluster, template: str) -> None:
        self._cluster = cluster
        # Our own server (PostgreSQL 18, no fsync): copying the template's files is a few times faster
        # than the default of writing it through the WAL. A server given by URL may predate STRATEGY (15).
        strategy = "" if isinstance(cluster, ExternalCluster) else " STRATEGY FILE_COPY"
        self._create = functools.partial(_create_database, cluster, template, strategy)
        # Two: the last test's drop need not hold up the next copy.
        self._worker = ThreadPoolExecutor(2, thread_name_prefix="test-databases")
        self._next = self._worker.submit(self._create)
        self._drops: list[tuple[str, Future[None]]] = []

    def take(self) -> str:
        try:
            name = self._next.result()
        except Exception:  # the server was away (a fault test stops it) while this one was made
            name = self._create()
        self._next = self._worker.submit(self._create)
        return name

    def drop(self, name: str) -> None:
        self._drops.append((name, self._worker.submit(_drop_database, self._cluster, name)))

    def close(self) -> None:
        """Drop the copy no test took, and again any the server was away for, before the template goes."""
        with contextlib.suppress(Exception):
            self.drop(self._next.result())
        self._worker.shutdown()
        for name, dropped in self._drops:
            if dropped.exception() is not None:
                _drop_database(self._cluster, name)


@pytest.fixture(scope="session")
def _copies(pg_cluster: Cluster, _bot_template: str) -> Iterator[_Copies]:
    copies = _Copies(pg_cluster, _bot_template)
    try:
        yield copies
    finally:
        copies.close()


@pytest.fixture
def database_url(pg_cluster: Cluster, _copies: _Copies) -> Iterator[str]:
    """A fresh database with every migration applied, dropped after the test."""
    name = _copies.take()
    try:
        yield pg_cluster.dsn(name)
    finally:
        _copies.drop(name)


@pytest.fixture
def empty_database_url(pg_cluster: Cluster) -> Iterator[str]:
    """A fresh database with nothing in it, for migration tests."""
    yield from _fresh_database(pg_cluster, "template0")


# --- Storages ---------------------------------------------------------------------------------------


@asynccontextmanager
async def open_storage(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    """ "memory", or "postgres" on the test's `database_url` (asked for only then), closed at the end."""
    if kind == "memory":
        from ..storage.memory import MemoryStorage

        yield MemoryStorage()
        return
    from ..storage.postgres import PostgresStorage

    postgres = await PostgresStorage.connect(request.getfixturevalue("database_url"), max_size=20)
    try:
        yield postgres
    finally:
        await postgres.close()


@pytest.fixture
def memory_storage() -> MemoryStorage:
    from ..storage.memory import MemoryStorage

    return MemoryStorage()


@pytest.fixture
async def postgres_storage(request: pytest.FixtureRequest) -> AsyncIterator[PostgresStorage]:
    from ..storage.postgres import PostgresStorage

    postgres = await PostgresStorage.connect(request.getfixturevalue("database_url"), max_size=20)
    try:
        yield postgres
    finally:
        await postgres.close()


@pytest.fixture(params=["memory", "postgres"])
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    """Each storage in turn: a test using it runs once on memory, once on PostgreSQL."""
    async with open_storage(request.param, request) as opened:
        yield opened


# --- The fake Bot API and the webhook ---------------------------------------------------------------


@pytest.fixture(scope="session")
def _fake_server() -> Iterator[tuple[FakeTelegram, str]]:
    from .env import USERNAME
    from .fake_telegram import FakeTelegram, serve

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


@pytest.fixture
def open_client() -> Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]:
    """`async with open_client(settings, bot=None, storage=None) as client`: the app in process, lifespan
    and all (no bot: the one the APP setting names; no storage: PostgreSQL at DATABASE_URL)."""
    from .webhook_client import asgi_client

    return asgi_client


class OpenWebhook(Protocol):
    def __call__(
        self, bot: Bot[Any], storage: Storage | None = None, **settings: str
    ) -> AbstractAsyncContextManager[WebhookClient]: ...


@pytest.fixture
def webhook(request: pytest.FixtureRequest, fake: FakeTelegram, telegram_root: str) -> OpenWebhook:
    """`async with webhook(bot, storage=None, **settings) as hook`: the bot served in process, its Bot
    API calls going to `fake`, its sessions in `storage` (default: a fresh PostgreSQL database);
    `settings` are environment variables on top (OUTBOX_SWEEP_INTERVAL="0.2")."""
    from .env import make_settings
    from .webhook_client import WebhookClient, asgi_client

    @asynccontextmanager
    async def open_webhook(
        bot: Bot[Any], storage: Storage | None = None, **settings: str
    ) -> AsyncIterator[WebhookClient]:
        url = request.getfixturevalue("database_url") if storage is None else "postgresql://unused/db"
        async with asgi_client(make_settings(url, telegram_root, **settings), bot, storage) as http:
            yield WebhookClient(http, fake)

    return open_webhook
