"""PostgreSQL storage on an asyncpg pool: where the bot's correctness lives.

One update is one transaction on one pooled connection. Every failure of the database or the connection
becomes StorageUnavailable (503, and Telegram delivers the update again), except a value the database
refuses, which becomes StorageRefused (the same value would be refused on every delivery: the update
becomes a dead letter). Nothing is kept on a connection between transactions, so all of it works the
same through PgBouncer in transaction mode.

One module per reason to change:

- `storage`: `PostgresStorage`, the facade: the pool opened, the transactions handed out and finished.
- `locking`: the locking transaction (the lock order and the round trips are in its docstring).
- `optimistic`: the optimistic transaction (no lock; one statement applies everything, or Conflict).
- `outbox`: the outbox table's queries: queueing calls, and the sender's side (`OutboxStore`).
- `timers`: the timers table's queries.
- `maintenance`: the hourly prune and the dead letters' listing.
- `peeks`: read-only looks for the playground.
- `pool`: the pool, pooler detection and pooler mode, statements outside a transaction.
- `statements`: what they all share: driver failures translated, parameters, a session row's columns.
"""

from __future__ import annotations

from .peeks import SessionRow
from .storage import PostgresStorage

__all__ = ["PostgresStorage", "SessionRow"]
