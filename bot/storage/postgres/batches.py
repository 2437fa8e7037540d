"""Optimistic statements of concurrent updates, sent together: one round trip and one commit for all.

Each optimistic update ends in one statement (`optimistic_sql.apply_text`), and a chat or sender not
remembered starts with a read (`optimistic_sql.read_text`). Under load many updates of different chats
reach them in the same turn of the event loop; sent one by one, each costs a round trip, a pooled
connection held, and for the statement a commit with its WAL flush (shared, on workload T the database's
CPU per update fell from 160 to 64 µs: bench/README.md). `Batches` gathers what is asked for with the
same text during one turn of the loop, or while that text's batch before it is under way (as
PostgreSQL's group commit gathers commits), and sends it with asyncpg's `fetchmany`: Bind and Execute
for each, one Sync. Until that Sync they are one transaction, so either all of them apply or none does.
(Reads write nothing: a batch of them is only one round trip.)

A row changed since it was read is no error: that statement applies nothing and answers so, as it
would alone, and the others apply. A statement the database refuses (a race on the update's claim, a
row changed between the snapshot and the write, a lock not free, a value it cannot store) aborts the
whole batch, and so does a broken connection. Each statement is then sent again on its own (`ALONE`),
where its transaction tells its own failure apart as it would have without the batch: one chat's
trouble costs the others of its batch a round trip (and, for those that hold no connection, a wait for
one, as any update's), never their outcome. Sending again is safe even when the batch's outcome is
unknown (the connection broke after the commit): each statement claims its update, and finds it
claimed, or its rows changed by itself, and is told apart as a redelivery.

A batched statement waits for no lock held elsewhere (`LOCK_TIMEOUT`, a few milliseconds instead of
DB_LOCK_TIMEOUT): a locking transaction of another chat with a slow handler would otherwise hold up
every update in the batch. The batch gives up and each statement is sent alone, with the usual wait.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ...metrics import Metrics
from .connections import Connections

__all__ = ["ALONE", "Batches"]

ALONE: Any = object()  # the statement was not applied in a batch: send it on its own
LOCK_TIMEOUT = "10ms"

_Waiting = list[tuple[Sequence[Any], int, "asyncio.Future[Any]"]]  # values, rows answered, answer


class Batches:
    """Statements gathered by text, sent in one round trip (see the module's docstring): those asked for
    during one turn of the event loop, or while the text's batch before them was under way. The batch
    takes a connection of its own from `connections` and gives it back: the updates in it hold none for
    their statement. `metrics` counts the batches sent and those that failed."""

    def __init__(self, connections: Connections, metrics: Metrics | None = None, limit: int = 32) -> None:
        self._connections = connections
        self._metrics = metrics
        self._limit = limit
        self._gathering: dict[str, _Waiting] = {}
        self._sending: Counter[str] = Counter()  # batches under way, by text
        self._tasks: set[asyncio.Task[list[Any]]] = set()

    async def fetch(self, query: str, values: Sequence[Any], answers: int = 1) -> Any:
        """The statement's answer (`answers` rows, as many as it always answers), or ALONE: send it on its
        own connection (it was the only one asked for in its turn, or its batch failed)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        waiting = self._gathering.get(query)
        if waiting is None:
            waiting = self._gathering[query] = []
            if not self._sending[query]:
                loop.call_soon(self._send, query, waiting)
            # Else the batch under way sends this one when it is done: a commit's time to gather more,
            # as PostgreSQL's group commit does (at most one round trip more for this statement).
        waiting.append((values, answers, future))
        if len(waiting) >= self._limit:
            self._send(query, waiting)
        return await future

    def _send(self, query: str, waiting: _Waiting) -> None:
        if self._gathering.get(query) is not waiting:
            return  # sent already (the limit was reached)
        del self._gathering[query]
        waiting = [member for member in waiting if not member[2].done()]
        if len(waiting) < 2:
            for _, _, future in waiting:
                future.set_result(ALONE)
            return
        self._sending[query] += 1
        task = asyncio.get_running_loop().create_task(self._run(query, [values for values, _, _ in waiting]))
        self._tasks.add(task)
        # Answered in a callback, not at the end of _run: also when the task is cancelled before it starts.
        task.add_done_callback(functools.partial(self._answer, query, waiting))

    async def _run(self, query: str, values: list[Sequence[Any]]) -> list[Any]:
        conn = await self._connections.take()
        try:
            return await conn.fetchmany(query, values)
        finally:
            await self._connections.give_back(conn)

    def _answer(self, query: str, waiting: _Waiting, task: asyncio.Task[list[Any]]) -> None:
        self._tasks.discard(task)
        # Whatever failed (a statement the database refused, a lock not free, the connection), the batch
        # is not known to have applied: each statement is sent again on its own and fails or applies
        # there as it would have alone. Had it applied after all (a connection lost after the commit),
        # each finds its update claimed, or its rows changed by itself, and is told apart as a
        # redelivery (its handlers may run again; nothing is applied twice).
        rows = task.result() if not task.cancelled() and task.exception() is None else []
        # fetchmany answers the statements' rows one after the other.
        complete = len(rows) == sum(answers for _, answers, _ in waiting)
        if self._metrics is not None:
            self._metrics.batches.labels("sent" if complete else "failed").inc()
        start = 0
        for _, answers, future in waiting:
            if not future.done():
                future.set_result(rows[start : start + answers] if complete else ALONE)
            start += answers
        self._sending[query] -= 1
        if not self._sending[query]:
            del self._sending[query]
            gathered = self._gathering.get(query)
            if gathered is not None:
                self._send(query, gathered)
