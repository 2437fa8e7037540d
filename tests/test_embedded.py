"""The embedded PostgreSQL that `serve` uses when no DATABASE_URL is set."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

import bot.embedded
from bot.embedded import EmbeddedPostgres, default_data_dir

pytestmark = pytest.mark.slow

# A process that starts the server in DATA, prints the postmaster's pid and the wheel's list of users of
# the server, and then waits to be killed (or, with "stop", stops it the way `serve` does on exit).
CHILD = """
import json, sys, time
from pathlib import Path
from bot.embedded import EmbeddedPostgres
data = Path(sys.argv[1])
server = EmbeddedPostgres.start(data)
pid = int((data / "postmaster.pid").read_text().split()[0])
print(json.dumps([pid, json.loads((data / ".handle_pids.json").read_text())]), flush=True)
if sys.argv[2] == "stop":
    server.stop()
else:
    time.sleep(600)
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data dir under /tmp itself: run as root, the wheel opens every parent folder to all users, and
    pytest's tmp_path sits in a folder kept private (/tmp/pytest-of-root)."""
    parent = Path(tempfile.mkdtemp(prefix="pizza-bot-test-"))
    parent.chmod(0o755)
    try:
        yield parent / "data"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


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


def test_data_lives_outside_home_folders_when_run_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_data_dir(None, "pizza-bot") == Path("/var/lib/pizza-bot/postgres")


def test_a_normal_user_keeps_the_data_in_xdg_data_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", "/home/u/.data")
    assert default_data_dir(None, "pizza-bot") == Path("/home/u/.data/pizza-bot/postgres")
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir(None, "todo-bot") == Path.home() / ".local/share/todo-bot/postgres"


def test_embedded_pg_dir_overrides_the_default() -> None:
    assert default_data_dir(Path("~/pg")) == Path.home() / "pg"


def test_a_temporary_server_serves_and_is_deleted_on_stop(data_dir: Path) -> None:
    with EmbeddedPostgres.start(data_dir, temporary=True) as server:
        assert asyncio.run(query(server.dsn(), "SELECT current_user || '@' || current_database()")) == (
            "postgres@postgres"
        )
    assert not data_dir.exists()


def test_restart_keeps_the_data(data_dir: Path) -> None:
    with EmbeddedPostgres.start(data_dir, temporary=True) as server:
        asyncio.run(query(server.dsn(), "CREATE TABLE kept (n int)", "INSERT INTO kept VALUES (42)"))
        server.restart()
        assert asyncio.run(query(server.dsn(), "SELECT n FROM kept")) == 42


def test_a_killed_bot_leaves_a_server_the_next_start_reuses_and_then_stops(data_dir: Path) -> None:
    first = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir), "wait"], stdout=subprocess.PIPE, text=True
    )
    assert first.stdout is not None
    postmaster, users = json.loads(first.stdout.readline())
    assert users == [first.pid]
    first.kill()  # kill -9: no cleanup runs
    first.wait(10)
    first.stdout.close()
    assert postmaster_alive(postmaster)

    second = subprocess.run(
        [sys.executable, "-c", CHILD, str(data_dir), "stop"], capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 0, second.stderr
    reused, users = json.loads(second.stdout)
    assert reused == postmaster  # reused, not a second server on the same data
    assert first.pid not in users  # the dead user forgotten...
    assert not postmaster_alive(postmaster, settle=10)  # ...so the clean exit stopped the server


def test_two_processes_starting_on_one_new_data_dir_share_its_server(data_dir: Path) -> None:
    # `serve` twice, or `serve` and `migrate`, on a new EMBEDDED_PG_DIR: the second saw the first's
    # half-made folder ("holds files but no PostgreSQL data"), or ran initdb or pg_ctl on it as well and
    # ended in a traceback. Each here has its own XDG_RUNTIME_DIR (a terminal and a `sudo`), where the
    # wheel keeps its lock, so that lock does not keep them apart either: only ours does.
    runs = []
    for n in range(2):
        runtime = data_dir.parent / f"runtime-{n}"
        runtime.mkdir(mode=0o700)
        env = {**os.environ, "DATABASE_URL": "", "BOT_TOKEN": "", "EMBEDDED_PG_DIR": str(data_dir)}
        runs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bot", "migrate"],
                env={**env, "XDG_RUNTIME_DIR": str(runtime)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    ended = [(run.communicate(timeout=120)[1], run.returncode) for run in runs]  # both, before asserting
    for stderr, returncode in ended:
        assert (returncode, "Traceback" in stderr) == (0, False), stderr
    assert (data_dir / "PG_VERSION").exists()
    assert not (data_dir / "postmaster.pid").exists()  # stopped by the last one out


def test_a_start_that_waits_too_long_for_another_says_so_and_touches_nothing(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process stuck in its start (or its stop) on the same data dir: a line, not a wait without end.
    monkeypatch.setattr(bot.embedded, "START_WAIT", 1.0)
    held = os.open(data_dir.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(
            RuntimeError, match=r"^another process has been starting or stopping a server in it"
        ):
            EmbeddedPostgres.start(data_dir)
    finally:
        os.close(held)
    assert not data_dir.exists()


def test_a_folder_that_cannot_be_locked_does_not_keep_the_trial_from_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On NFS a folder opened to read takes no flock (EBADF): the lock is skipped, as before it existed,
    instead of the local trial stopping at start."""

    def refused(fd: int, operation: int) -> None:
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(bot.embedded.fcntl, "flock", refused)
    entered = False
    with bot.embedded._one_at_a_time(tmp_path / "data"):
        entered = True
    assert entered
