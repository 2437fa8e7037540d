"""PgBouncer in transaction mode in front of a PostgreSQL server: what Neon's and Supabase's pooled URLs
and Heroku's connection pooling are, run here for tests and benchmarks.

The configuration is PgBouncer's stock one where it matters (transaction pooling, unknown startup
parameters refused except `extra_float_digits`), so what works here works behind a managed pooler.
PgBouncer refuses to run as root; as root it runs as `run_as` (a user that can reach the server's socket).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import asyncpg

from .processes import free_port

__all__ = ["PgBouncer", "pgbouncer_binary"]


def pgbouncer_binary() -> str | None:
    """Where pgbouncer is installed (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


class PgBouncer:
    """One pgbouncer process on a free loopback port, forwarding every database name to `server_url`."""

    def __init__(
        self,
        server_url: str,
        *,
        run_as: str | None = None,
        pool_size: int = 20,
        pool_mode: str = "transaction",
    ) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise FileNotFoundError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        parts = urlsplit(server_url)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
        self.user = unquote(parts.username or "postgres")
        password = unquote(parts.password or "")
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="bot-pgbouncer-"))
        upstream = f"host={host} port={parts.port or 5432} user={self.user}"
        if password:
            upstream += f" password={password}"
        (self.workdir / "userlist.txt").write_text(f'"{self.user}" ""\n')
        config = self.workdir / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = {upstream}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.workdir / 'userlist.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            "max_client_conn = 1000\n"
            f"default_pool_size = {pool_size}\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.workdir / 'pgbouncer.log'}\n"
        )
        user = None
        if os.geteuid() == 0:
            user = pwd.getpwnam(run_as or "postgres")
            for path in (self.workdir, *self.workdir.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._server_url = server_url
        self.proc = subprocess.Popen(
            [binary, str(config)],
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"pgbouncer not listening within {timeout} s:\n{self.log()[-3000:]}")

    def dsn(self, database: str = "postgres") -> str:
        """A URL through the pooler to `database` on the server."""
        return urlunsplit(("postgresql", f"{self.user}@127.0.0.1:{self.port}", "/" + database, "", ""))

    def pooled(self, url: str) -> str:
        """The same database as the server URL `url`, through the pooler."""
        return self.dsn(urlsplit(url).path.lstrip("/") or "postgres")

    async def leave_prepared_statements(self, url: str, sessions: int = 4, count: int = 64) -> None:
        """Leave the named statements a process's asyncpg prepares first (`__asyncpg_stmt_1__` to
        `count`, in hex) on `sessions` server sessions of the database of server URL `url`, as a client
        with asyncpg's statement cache on leaves them behind this pooler: in transaction mode nothing
        resets a server session when its client leaves. Each client holds a transaction open while it
        prepares, so that each is on a server session of its own."""
        clients = [await asyncpg.connect(self.pooled(url), statement_cache_size=0) for _ in range(sessions)]
        try:
            for client in clients:
                await client.execute(
                    "BEGIN; "
                    + "; ".join(f"PREPARE __asyncpg_stmt_{n:x}__ AS SELECT {n}" for n in range(1, count + 1))
                )
            await asyncio.gather(*(client.execute("COMMIT") for client in clients))
        finally:
            for client in clients:
                await client.close()

    @asynccontextmanager
    async def holding_a_server_session(self, url: str) -> AsyncIterator[None]:
        """Hold the server session the pooler lent last (it lends the most recently used one first)
        inside an open transaction: the next client to run something gets another one."""
        client = await asyncpg.connect(self.pooled(url), statement_cache_size=0)
        try:
            await client.execute("BEGIN; SELECT 1")
            yield
        finally:
            await client.close()

    def log(self) -> str:
        path = self.workdir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
