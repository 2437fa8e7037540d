"""Recording an update that failed for good, in one transaction: claim it (for a replay: take its dead
letter again), hand the error to the bot's error hook, and, unless the hook handled it, record the update
as a dead letter (`python -m bot replay` runs it again once fixed). The pipeline decides when (a
deterministic failure, or a transient one that repeated too often for too long: `bot.failures`).
"""

from __future__ import annotations

import logging
from typing import Any

from .context import BotIdentity, Context, ImmediateApi
from .dispatch import ErrorHook
from .failures import as_failure, dead_letter, describe, is_transient
from .outcome import Outcome, Status
from .storage import Storage
from .types import Update

__all__ = ["Recorder", "handled"]

log = logging.getLogger("bot.pipeline")  # the pipeline's log: where an operator follows an update


class Recorder:
    def __init__(self, storage: Storage, me: BotIdentity, api: ImmediateApi, lease: float) -> None:
        self.storage = storage
        self.me = me
        self.api = api
        self.lease = lease  # of the calls the error hook queues

    async def record(
        self,
        update: Update,
        error: Exception,
        *,
        hook: ErrorHook | None,
        replay: bool = False,
        attempts: int = 1,
        line: str | None = None,
    ) -> Outcome:
        """Claim the failed update (for a replay: take its dead letter again), hand the error to the error
        hook, and record the update as a dead letter, in one transaction. A hook that returns normally
        handled the error: what it queued is sent, and nothing is recorded. Its context has no sessions:
        this runs after the attempt was rolled back (or for a failure before any was loaded)."""
        update_id = update.update_id
        async with self.storage.transaction() as tx:
            if replay:
                taken = await tx.take_dead_letter(self.me.id, update_id)
                if taken is None:
                    return Outcome(Status.DUPLICATE)  # replayed meanwhile
                attempts = taken.attempts + 1
            elif not await tx.claim_update(self.me.id, update_id):
                # Applied or recorded meanwhile, by a delivery that overlapped this one.
                return Outcome(Status.DUPLICATE, await tx.claim_unsent(self.me.id, update_id, self.lease))
            if hook is not None:
                ctx: Context[Any] = Context(update, self.me, self.api)
                try:
                    await hook(error, ctx)
                except BaseException as caught:
                    failure = as_failure(caught)
                    if failure is None or is_transient(failure):
                        raise
                    if failure is not error and failure.__context__ is None:
                        failure.__context__ = error  # the traceback shows what the hook was handling
                    error = failure
                else:
                    handled(update, error)
                    if ctx.timers:
                        await tx.schedule(self.me.id, ctx.timers)
                    return Outcome(
                        Status.FAILED, await tx.enqueue(self.me.id, update_id, ctx.calls, self.lease)
                    )
            letter = dead_letter(update, error, attempts, line)
            await tx.dead_letter(self.me.id, letter)
        log.error(
            "update %d is a dead letter (attempt %d): %s; `python -m bot replay %d` runs it again once fixed",
            update_id,
            attempts,
            letter.error,
            update_id,
            extra={"update_id": update_id, "chat": letter.chat, "outcome": Status.DEAD_LETTER.value},
        )
        return Outcome(Status.DEAD_LETTER)


def handled(update: Update, error: Exception) -> None:
    log.error(
        "update %d failed, and the error hook handled it: %s",
        update.update_id,
        describe(error),
        exc_info=error,
        extra={"update_id": update.update_id, "outcome": Status.FAILED.value},
    )
