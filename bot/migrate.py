"""Numbered SQL migrations, applied once each, safely when several instances start together.

`migrations/NNN_name.sql` files (at the top of the repository; the build copies them into the package,
so a wheel or `pip install .` has them too) run in numeric order, each in its own transaction, and are
recorded in `schema_migrations` with a checksum, so an edited, already-applied file is an error rather
than a silent difference between databases. Each of those transactions first takes a transaction-level advisory lock and only then reads
what is applied: a second instance starting at the same moment waits, then finds nothing left to do. A
transaction-level lock (not a session-level one) is what stays correct through a transaction-mode
pooler, where one client connection's transactions may run on different server sessions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .errors import BotError
from .pooler import NO_STATEMENT_CACHE

# A direct connection or one borrowed from a pool.
Connection = asyncpg.Connection | PoolConnectionProxy

__all__ = ["MIGRATIONS_DIR", "MigrationError", "NotMigrated", "check_migrated", "migrate", "pending"]


def _migrations_dir() -> Path:
    """`migrations/` beside the package in a checkout (the source: `pip install -e .` and a plain checkout
    read it there), else the copy the build put inside the installed package (a wheel, `pip install .`:
    pyproject.toml maps `migrations/` to `bot/migrations/`)."""
    package = Path(__file__).resolve().parent
    source = package.parent / "migrations"
    if (package.parent / "pyproject.toml").is_file() and source.is_dir():
        return source
    return package / "migrations"


MIGRATIONS_DIR = _migrations_dir()

# The advisory lock every migration step takes: any fixed 64-bit number (this one is the first 8 bytes of
# sha256("bot.migrate: schema_migrations"), as a signed bigint).
_LOCK_ID = -3683404983626821890
# The number before it, which releases up to this one's predecessor take instead. During a rolling deploy
# the old release's `migrate` (or MIGRATE_ON_START) can run while the new one's does, so every step takes
# both, the old one first: an old process then waits for a new one and the other way round, and two new
# ones take them in the same order (no deadlock). Drop it once no release older than this one can run.
_LEGACY_LOCK_ID = 0x70697A7A616D6967
_LOCKS = (_LEGACY_LOCK_ID, _LOCK_ID)

_NAME = re.compile(r"^(\d+)_[\w-]+\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(BotError):
    """The migrations on disk and the ones recorded in the database disagree."""


class NotMigrated(MigrationError):
    """The database is not at the schema this code needs: unmigrated, or migrated from other files."""


@dataclass(frozen=True)
class _Migration:
    version: int
    name: str
    sql: str
    checksum: str


def _load(directory: Path) -> list[_Migration]:
    found: dict[int, _Migration] = {}
    if not directory.is_dir() or not any(directory.glob("*.sql")):
        # Never "up to date" with nothing to compare: an install that lost its migrations must fail.
        raise MigrationError(f"no migrations found in {directory} (is the package installed completely?)")
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files are named NNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path.name}: version {version} is also {found[version].name}")
        data = path.read_bytes()
        found[version] = _Migration(version, path.name, data.decode(), hashlib.sha256(data).hexdigest())
    return [found[v] for v in sorted(found)]


async def _applied(conn: Connection) -> dict[int, tuple[str, str]]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
    return {r["version"]: (r["name"], r["checksum"]) for r in rows}


def _compare(
    files: list[_Migration], applied: dict[int, tuple[str, str]], directory: Path
) -> list[_Migration]:
    """The files still to apply; raise if an applied file was edited or removed."""
    by_version = {m.version: m for m in files}
    for version, (name, checksum) in sorted(applied.items()):
        on_disk = by_version.get(version)
        if on_disk is None:
            raise MigrationError(f"{name} was applied to this database but is missing from {directory}")
        if on_disk.checksum != checksum:
            raise MigrationError(
                f"{on_disk.name} was edited after it was applied (checksum differs); "
                "add a new migration instead of changing an applied one"
            )
    return [m for m in files if m.version not in applied]


async def pending(conn_or_dsn: Connection | str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Names of the migrations this database still needs; MigrationError if it disagrees with the files."""
    files = _load(directory)
    if not isinstance(conn_or_dsn, str):
        return [m.name for m in _compare(files, await _applied(conn_or_dsn), directory)]
    conn = await asyncpg.connect(conn_or_dsn, timeout=30, **NO_STATEMENT_CACHE)
    try:
        return [m.name for m in _compare(files, await _applied(conn), directory)]
    finally:
        await conn.close()


async def check_migrated(conn: Connection, directory: Path = MIGRATIONS_DIR) -> None:
    """Raise NotMigrated unless every migration on disk, unchanged, is applied (for `serve`, `/readyz`)."""
    try:
        missing = await pending(conn, directory)
    except NotMigrated:
        raise
    except MigrationError as exc:
        raise NotMigrated(f"the database does not match {directory.name}/: {exc}") from exc
    if missing:
        raise NotMigrated(
            f"the database is not migrated (missing {', '.join(missing)}); run `python -m bot migrate`"
        )


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply what is missing; return the names applied now (empty when up to date).

    The connection keeps no named statement on the server, whatever DB_POOLER says: through a pooler,
    a name left on a server session would break the next client that meets it there."""
    files = _load(directory)
    applied_now: list[str] = []
    conn = await asyncpg.connect(dsn, timeout=30, **NO_STATEMENT_CACHE)
    try:
        while True:
            # One file per transaction, each under the lock and each deciding afresh what is next, so
            # nothing depends on the session: through a pooler the next transaction may be another
            # server session. The lock is released by COMMIT or ROLLBACK, and by the server if this
            # process dies mid-file.
            async with conn.transaction():
                for lock in _LOCKS:
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
                await conn.execute(_CREATE_TABLE)
                todo = _compare(files, await _applied(conn), directory)
                if not todo:
                    return applied_now
                migration = todo[0]
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(migration.name)
    finally:
        await conn.close()
