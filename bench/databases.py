"""The benchmarks' PostgreSQL: DATABASE_URL's server or a throwaway embedded one, and databases of their own
on it, empty or migrated by this checkout's code."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bot.embedded import EmbeddedPostgres
from bot.migrate import migrate

__all__ = ["create_database", "fresh_database", "new_database", "postgres_server"]


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[str, str]]:
    """DATABASE_URL's server, or a throwaway embedded one stopped at the end; and which of the two."""
    url = os.environ.get("DATABASE_URL")
    if url is not None:
        yield url, "from DATABASE_URL"
        return
    embedded = EmbeddedPostgres.throwaway()
    try:
        yield embedded.dsn("postgres"), "embedded"
    finally:
        embedded.stop()


async def _admin(dsn: str, query: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(query)
    finally:
        await conn.close()


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


async def _create(server_url: str, prefix: str) -> str:
    """A new, empty database on the server of `server_url` (a DSN of any of its databases): its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    await _admin(server_url, f"CREATE DATABASE {name}")
    return name


async def create_database(server_url: str, prefix: str = "bench") -> str:
    """A new, empty database on that server, kept: its DSN."""
    return _with_database(server_url, await _create(server_url, prefix))


@contextlib.asynccontextmanager
async def new_database(server_url: str) -> AsyncIterator[str]:
    """An empty database of its own on that server (its DSN), dropped afterwards."""
    name = await _create(server_url, "bench")
    try:
        yield _with_database(server_url, name)
    finally:
        await _admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def fresh_database(server_url: str) -> str:
    """A new database migrated by this checkout's code, kept (for scripts that run one system)."""
    dsn = await create_database(server_url)
    await migrate(dsn)
    return dsn
