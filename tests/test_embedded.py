"""The embedded PostgreSQL that `serve` uses when no DATABASE_URL is set."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from bot.embedded import EmbeddedPostgres, default_data_dir

pytestmark = pytest.mark.slow

# A process that starts the server in DATA, prints the postmaster's pid, and then waits to be killed
# (or, with "stop", stops it the way `serve` does on exit).
CHILD = """
import sys, time
from pathlib import Path
from bot.embedded import EmbeddedPostgres
server = EmbeddedPostgres.start(Path(sys.argv[1]))
print((Path(sys.argv[1]) / "postmaster.pid").read_text().split()[0], flush=True)
if sys.argv[2] == "stop":
    server.stop()
else:
    time.sleep(600)
"""


def postmaster_alive(pid: int, settle: float = 0.0) -> bool:
    """Whether the process exists; with `settle`, give an exiting one that long to be reaped."""
    deadline = time.monotonic() + settle
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)


async def query(dsn: str, *statements: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements[:-1]:
            await conn.execute(statement)
        return await conn.fetchval(statements[-1])
    finally:
        await conn.close()


def test_data_lives_outside_home_folders_when_run_as_root() -> None:
    path = default_data_dir()
    if os.geteuid() == 0:
        assert path == Path("/var/lib/pizza-bot/postgres")
    else:
        assert path.is_relative_to(Path.home() / ".local" / "share") or "XDG_DATA_HOME" in os.environ


def test_restart_keeps_the_data(tmp_path: Path) -> None:
    with EmbeddedPostgres.start(tmp_path / "data", temporary=True) as server:
        asyncio.run(query(server.dsn(), "CREATE TABLE kept (n int)", "INSERT INTO kept VALUES (42)"))
        server.restart()
        assert asyncio.run(query(server.dsn(), "SELECT n FROM kept")) == 42


def test_a_killed_bot_leaves_a_server_the_next_start_reuses_and_then_stops(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), "wait"], stdout=subprocess.PIPE, text=True
    )
    assert first.stdout is not None
    postmaster = int(first.stdout.readline())
    first.kill()  # kill -9: no cleanup runs
    first.wait(10)
    first.stdout.close()
    assert postmaster_alive(postmaster)

    second = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), "stop"], capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 0, second.stderr
    assert int(second.stdout.split()[0]) == postmaster  # reused, not a second server on the same data
    assert not postmaster_alive(postmaster, settle=10)  # and stopped on a clean exit, despite the dead user
