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
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

__all__ = ["POOLER_MODES", "connect_options", "transaction_pooler"]

# DB_POOLER: "auto" recognises the pooled URLs of known providers; the others say what is there.
POOLER_MODES = ("auto", "transaction", "none")

# PgBouncer's default port, also the one Supabase's dedicated PgBouncer listens on in transaction mode.
_POOLER_PORTS = {6432, 6543}


def transaction_pooler(dsn: str, mode: str = "auto") -> bool:
    """Whether connections to `dsn` go through a transaction-mode pooler."""
    if mode != "auto":
        return mode == "transaction"
    parts = urlsplit(dsn)
    host = (parts.hostname or "").lower()
    port = parts.port
    if "-pooler." in host:  # Neon's pooled endpoint: ep-name-123-pooler.region.aws.neon.tech
        return True
    if host.endswith(".pooler.supabase.com"):  # Supavisor: 6543 is transaction mode, 5432 session mode
        return port == 6543
    return port in _POOLER_PORTS


def connect_options(dsn: str, mode: str = "auto") -> dict[str, Any]:
    """Keyword arguments for asyncpg.connect()/create_pool() to `dsn`."""
    return {"statement_cache_size": 0} if transaction_pooler(dsn, mode) else {}
