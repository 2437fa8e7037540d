from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from bot.migrate import MIGRATIONS_DIR, MigrationError, NotMigrated, check_migrated, migrate, pending

pytestmark = pytest.mark.anyio

REAL = sorted(path.name for path in MIGRATIONS_DIR.glob("*.sql"))
REAL_APPLIED = [(int(name.split("_", 1)[0]), name) for name in REAL]
# The tests' own migration comes after every real one, whatever their number.
NOTES_VERSION = REAL_APPLIED[-1][0] + 1
NOTES = f"{NOTES_VERSION:03d}_notes.sql"


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    """A copy of the real migrations, plus one after them, to edit freely."""
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    (directory / NOTES).write_text("CREATE TABLE notes (id int PRIMARY KEY);\n")
    return directory


async def applied(dsn: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [
            tuple(r) for r in await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        ]
    finally:
        await conn.close()


async def test_applies_every_file_in_order_and_rerunning_is_a_no_op(
    empty_database_url: str, migrations: Path
) -> None:
    assert await migrate(empty_database_url, migrations) == [*REAL, NOTES]
    assert await migrate(empty_database_url, migrations) == []
    assert await applied(empty_database_url) == [*REAL_APPLIED, (NOTES_VERSION, NOTES)]


async def test_an_applied_file_that_was_edited_is_an_error_naming_it(
    empty_database_url: str, migrations: Path
) -> None:
    await migrate(empty_database_url, migrations)
    (migrations / NOTES).write_text("CREATE TABLE notes (id bigint PRIMARY KEY);\n")
    with pytest.raises(MigrationError, match=rf"{NOTES} was edited after it was applied"):
        await migrate(empty_database_url, migrations)


async def test_an_applied_file_missing_on_disk_is_an_error(empty_database_url: str, migrations: Path) -> None:
    await migrate(empty_database_url, migrations)
    (migrations / NOTES).unlink()
    with pytest.raises(MigrationError, match=rf"{NOTES} was applied to this database but is missing"):
        await migrate(empty_database_url, migrations)


async def test_a_failing_migration_leaves_nothing_of_itself(
    empty_database_url: str, migrations: Path
) -> None:
    (migrations / f"{NOTES_VERSION + 1:03d}_broken.sql").write_text(
        "CREATE TABLE half (id int); SELECT no_such_function();\n"
    )
    with pytest.raises(asyncpg.PostgresError):
        await migrate(empty_database_url, migrations)
    assert await applied(empty_database_url) == [*REAL_APPLIED, (NOTES_VERSION, NOTES)]
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('half')") is None
    finally:
        await conn.close()


async def test_instances_starting_together_apply_each_file_once(
    empty_database_url: str, migrations: Path
) -> None:
    results = await asyncio.gather(*(migrate(empty_database_url, migrations) for _ in range(5)))
    # Each file by exactly one of them (not necessarily the same one: the lock is taken per file).
    assert sorted(name for applied_here in results for name in applied_here) == sorted([*REAL, NOTES])
    assert await applied(empty_database_url) == [*REAL_APPLIED, (NOTES_VERSION, NOTES)]


async def test_check_migrated_refuses_a_database_migrated_from_other_files(
    empty_database_url: str, migrations: Path
) -> None:
    await migrate(empty_database_url, migrations)
    (migrations / NOTES).write_text("CREATE TABLE notes (id bigint PRIMARY KEY);\n")
    conn = await asyncpg.connect(empty_database_url)
    try:
        # NotMigrated, so /readyz answers 503 rather than failing with an unexpected error.
        with pytest.raises(NotMigrated, match=rf"{NOTES} was edited"):
            await check_migrated(conn, migrations)
    finally:
        await conn.close()


async def test_pending_takes_a_dsn_too(empty_database_url: str, migrations: Path) -> None:
    assert await pending(empty_database_url, migrations) == [*REAL, NOTES]
    await migrate(empty_database_url, migrations)
    assert await pending(empty_database_url, migrations) == []


async def test_check_migrated_refuses_an_unmigrated_database(
    empty_database_url: str, migrations: Path
) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        with pytest.raises(NotMigrated, match="run `python -m bot migrate`"):
            await check_migrated(conn, migrations)
        await migrate(empty_database_url, MIGRATIONS_DIR)
        assert await pending(conn, migrations) == [NOTES]
        await migrate(empty_database_url, migrations)
        await check_migrated(conn, migrations)
    finally:
        await conn.close()


def test_badly_named_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "create_things.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNN_name\.sql"):
        asyncio.run(migrate("postgresql://unused/db", tmp_path))


# The lock id releases before this one took, and the one they take now (bot/migrate.py).
OLD_RELEASES_LOCK = 0x70697A7A616D6967
THIS_RELEASES_LOCK = -3683404983626821890


@pytest.mark.parametrize("held", [OLD_RELEASES_LOCK, THIS_RELEASES_LOCK], ids=["old release", "new release"])
async def test_a_migration_waits_for_another_release_migrating_at_the_same_time(
    empty_database_url: str, migrations: Path, held: int
) -> None:
    """During a rolling deploy, an old release's migrate and the new one's may overlap: whichever lock id
    the other side takes, this one waits for it instead of applying the same file next to it."""
    other = await asyncpg.connect(empty_database_url)
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.execute("SELECT pg_advisory_xact_lock($1)", held)
        running = asyncio.ensure_future(migrate(empty_database_url, migrations))
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        for _ in range(400):
            if await other.fetchval(waiting):
                break
            await asyncio.sleep(0.025)
        assert await other.fetchval(waiting) == 1
        assert not running.done()
        await transaction.rollback()
        assert await asyncio.wait_for(running, 60) == sorted([*REAL, NOTES])
    finally:
        await other.close()


async def test_the_send_leases_migration_ends_an_hour_long_pause_of_every_send(
    empty_database_url: str, tmp_path: Path
) -> None:
    # The old rule paused every send for a 429's whole retry_after once two chats were paused, and
    # kept it in the database, so a restart found the bot silenced still. 005 ends such a pause; the
    # chats' own pauses stay.
    before = tmp_path / "before"
    before.mkdir()
    for name in REAL:
        if int(name.split("_", 1)[0]) < 5:
            shutil.copy(MIGRATIONS_DIR / name, before / name)
    await migrate(empty_database_url, before)
    conn = await asyncpg.connect(empty_database_url)
    try:
        until = await conn.fetchval("SELECT extract(epoch FROM now())::float8 + 3600")
        await conn.execute(
            "INSERT INTO send_budget (key, paused_until) VALUES ('*', $1), ('-5', $1), ('-6', $1)", until
        )
        await migrate(empty_database_url, MIGRATIONS_DIR)
        paused = dict(await conn.fetch("SELECT key, paused_until FROM send_budget ORDER BY key"))
    finally:
        await conn.close()
    assert paused == {"*": 0, "-5": until, "-6": until}
