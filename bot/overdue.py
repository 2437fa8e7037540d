"""An update's attempt still running well past its deadline: its code ignored the cancellation (a bare
`except:` in a handler's retry loop, a `suppress(BaseException)`), and it may run for good.

Its key's turn is let go (`TURN_STUCK_AFTER`, `bot.unit.LockTurns`), but what its transactions hold
cannot be let go from inside a task that does not listen: with locks, a pooled connection in an open
transaction and the chat's row lock; without, the connection its session was read on. A few such
attempts held every connection of the pool, and every chat got 503 after DB_ACQUIRE_TIMEOUT for as long
as they ran. `Reclaim` takes those back from outside (`ReclaimingStorage.reclaim`: the connections are
closed, so the database rolls their transactions back) RECORD_WITHIN after the deadline, then every
RECORD_WITHIN while the attempt runs (it may open another transaction: its error hook's), and says so
once, naming the update and where its code is.

What the taken-back connections carried is rolled back, and each statement the attempt sends on them
afterwards fails (StorageUnavailable, a transient failure). An attempt that holds no connection when
looked at (an optimistic one whose read went in a shared batch, or one between two transactions) is
not stopped: should it end, it commits as any attempt does. Either way the update is applied at most
once, by its claim of the update id, which commits with its writes: its redeliveries wait for this
attempt (`bot.redelivery`), and as long as it runs they end as a dead letter at the bound
(`TransientFailures`), recorded by a transaction of their own, whose claim a late commit of the attempt
then fails on; after it ended, a redelivery is answered as a duplicate. A dead letter can be replayed.
So it is counted once or not at all, never twice. (Connections taken in a task the attempt started, not
in its own, are not found: `Connections` keeps each with the task that took it.)
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from .dispatch import Bot
from .metrics import Metrics
from .storage import ReclaimingStorage, Storage
from .types import Update

__all__ = ["Reclaim", "where"]

log = logging.getLogger("bot.pipeline")  # the pipeline's log: where an operator follows an update

_ASYNCIO = os.path.dirname(asyncio.__file__)


class Reclaim:
    """`Deadlines`' `on_overdue` for the pipeline's request deadline (`bot.deadline`), told of an attempt
    `overdue_after` past it. That is RECORD_WITHIN, the time a dead letter's recording gets once the
    deadline has passed: an attempt that listens to its cancellation has rolled back and given its
    connection back long before, and REQUEST_DEADLINE (at most 55 s) plus it stays within Telegram's
    60 s, so within TURN_STUCK_AFTER: the row is unlocked before the key's next update is let past the
    stuck turn, and finds it free."""

    def __init__(self, bot: Bot[Any], storage: Storage, metrics: Metrics, deadline: float) -> None:
        self._bot = bot
        self._storage = storage
        self._metrics = metrics
        self._deadline = deadline  # (REQUEST_DEADLINE, for the warning)

    def _storages(self) -> dict[int, Storage]:
        """The bot's storage and every other one a session names (looked up for an overdue attempt only)."""
        storages = {id(self._storage): self._storage}
        for config in self._bot.sessions.values():
            if config.storage is not None:
                storages[id(config.storage)] = config.storage
        return storages

    def __call__(self, task: asyncio.Task[Any], what: object, late: float, first: bool) -> None:
        closed = 0
        for storage in self._storages().values():
            if isinstance(storage, ReclaimingStorage):
                closed += storage.reclaim(task)
        if first:
            self._metrics.stuck_updates.inc()
        if not first and not closed:
            return
        update = what if isinstance(what, Update) else None
        chat = None if update is None or update.chat is None else update.chat.id
        held = (
            f"closed the {closed} database connection(s) it held: its transaction is rolled back, and its"
            " next statement fails"
            if closed
            else "it holds no database connection now"
        )
        log.warning(
            "update %s (chat %s) is still running %.1f s past its %g s deadline, at %s: its code ignores"
            " cancellation; %s. Its redeliveries end as a dead letter while it runs",
            "?" if update is None else update.update_id,
            chat,
            late,
            self._deadline,
            where(task),
            held,
            extra={
                "update_id": None if update is None else update.update_id,
                "chat": chat,
                "outcome": "stuck",
            },
        )


def where(task: asyncio.Task[Any]) -> str:
    """Where the task's code waits: the innermost coroutine of its await chain outside asyncio (the
    handler's own line when it awaits asyncio.sleep or an Event), as `function (file:line)`. (Not
    `Task.get_stack`, which gives the outermost coroutine's frame only.)"""
    found = "an unknown place"
    awaited: Any = task.get_coro()
    while (frame := getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)) is not None:
        code = frame.f_code
        if not code.co_filename.startswith(_ASYNCIO):
            found = f"{code.co_qualname} ({code.co_filename}:{frame.f_lineno})"
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return found
