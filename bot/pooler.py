"""Connection poolers in front of PostgreSQL, and what the bot does differently behind one.

A pooler in transaction mode (PgBouncer's `pool_mode = transaction`, which is what Neon's and Supabase's
pooled URLs and Heroku's connection pooling are) lends a server connection per transaction: two
transactions of one client connection may run on two server sessions. So anything that lives in a
session breaks there:
- asyncpg's cache of named prepared statements: a statement prepared on one server session is missing on
  the next ("prepared statement ... does not exist"), or a new client meets a name an earlier client left
  behind (DuplicatePreparedStatementError). Behind such a pooler the cache is off: each query is prepared
  unnamed, within the same round trip sequence that binds it (an extra round trip per query).
- startup parameters (PgBouncer refuses unknown ones) and SET: the storage sets its timeouts with SET LOCAL
  inside each transaction instead, in every mode, so there is one code path.
- session-level advisory locks: migrations take a transaction-level lock per step (bot/migrate.py).

How the bot knows (DB_POOLER): `transaction` and `none` say so; `auto` recognises the pooled URLs of known
providers, and for any other URL asks at start-up (`pools_transactions`). Whatever the setting,
the storage switches to pooler mode at the first prepared-statement error (`broken_prepared_statement`)
and runs the update again (bot/storage/postgres/pool.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import asyncpg

__all__ = [
    "NO_STATEMENT_CACHE",
    "POOLER_MODES",
    "broken_prepared_statement",
    "pools_transactions",
    "transaction_pooler",
]

# DB_POOLER: "auto" recognises known URLs and asks the server about others; the others say what is there.
POOLER_MODES = ("auto", "transaction", "none")

# asyncpg.connect()/create_pool() arguments for a connection that keeps no named statement on the server:
# the pool's behind a transaction-mode pooler, and every one-off connection (migrations, start-up checks),
# which gains nothing from a cache and, through a pooler, would leave names behind for the next client.
NO_STATEMENT_CACHE: Mapping[str, Any] = MappingProxyType({"statement_cache_size": 0})

# PgBouncer's default port, also the one Supabase's dedicated PgBouncer listens on in transaction mode.
_POOLER_PORTS = {6432, 6543}

# What a named prepared statement meets behind a transaction-mode pooler, and nowhere else in this bot.
_PREPARED_STATEMENT_ERRORS = (asyncpg.InvalidSQLStatementNameError, asyncpg.DuplicatePreparedStatementError)


def transaction_pooler(dsn: str, mode: str = "auto") -> bool | None:
    """Whether connections to `dsn` go through a transaction-mode pooler, as DB_POOLER or the URL says;
    None when `auto` does not know the URL (then `pools_transactions` asks)."""
    if mode != "auto":
        return mode == "transaction"
    parts = urlsplit(dsn)
    host = (parts.hostname or "").lower()
    port = parts.port
    if host.endswith(".neon.tech"):  # pooled: ep-name-123-pooler.region.aws.neon.tech
        return "-pooler." in host
    if host.endswith((".pooler.supabase.com", ".supabase.co")):
        # Supavisor: 6543 is transaction mode, 5432 session mode; db.<ref>.supabase.co: PgBouncer on
        # 6543, the server itself on 5432.
        return port == 6543
    if port in _POOLER_PORTS:
        return True
    return None


async def pools_transactions(connect: Callable[[], Awaitable[asyncpg.Connection]]) -> bool:
    """Whether the connections `connect` makes (keeping no named statement) reach PostgreSQL through a
    pooler that lends a server session per transaction. Two connections, a few round trips.

    First, whether a pooler answers at all: the process id the server sent at connect is not the one
    serving the connection (a pooler makes its own up, since it routes the client's cancel requests
    itself; PostgreSQL sends its own). Then, whether it keeps a client on one server session: a setting
    made by the first connection must still be there after a second one took the session the pooler
    lent last (PgBouncer lends the most recently used first). A pooler in session mode keeps it, and
    named statements work there; one in transaction mode lends the first another session, or none at
    all while the only one is taken (then the question times out: the same answer)."""
    first = await connect()
    try:
        if await first.fetchval("SELECT pg_backend_pid()") == first.get_server_pid():
            return False  # the server itself
        token = secrets.token_hex(8)
        await first.execute(f"SELECT set_config('bot.pooler_probe', '{token}', false)")
        second = await connect()
        try:
            await second.execute("BEGIN")
            try:
                seen = await first.fetchval("SELECT current_setting('bot.pooler_probe', true)", timeout=5)
            except TimeoutError:
                return True
        finally:
            await second.close()
        return bool(seen != token)
    finally:
        await first.close()


def broken_prepared_statement(exc: BaseException) -> BaseException | None:
    """The error, `exc` or one it was raised from, of a named prepared statement failing the way it does
    behind a transaction-mode pooler; None if there is none. Such a statement did not run (its name was
    refused at Parse or Bind), so what it belonged to can run again."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, _PREPARED_STATEMENT_ERRORS):
        seen = seen.__cause__
    return seen
