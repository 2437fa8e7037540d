"""Sending what the handlers queued, after the commit, and again after a crash.

A call is marked sent only once the Bot API confirmed it. A process that dies between sending and
marking leaves the call to be sent again when its lease runs out: Telegram has no idempotency key, so
that one window (milliseconds) is the only way a reply can be doubled; none can be lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence

from .metrics import Metrics
from .storage import PendingCall, Storage, StorageUnavailable
from .telegram import BotApi, BotApiError

__all__ = ["Outbox"]

log = logging.getLogger("bot.outbox")

# Processed update ids must outlive Telegram's redelivery window (24 h for messages) with margin.
KEEP_UPDATES = 25 * 3600.0
KEEP_SENT = 24 * 3600.0
RETRY_DELAY = 5.0


class Outbox:
    """Sends leased calls in the background and tracks the tasks so shutdown can wait for them."""

    def __init__(
        self, storage: Storage, api: BotApi | None, metrics: Metrics, *, lease: float = 30.0
    ) -> None:
        self._storage = storage
        self._api = api  # None: local trial without a token; calls are logged instead of sent
        self._metrics = metrics
        self._lease = lease
        self._tasks: set[asyncio.Task[None]] = set()

    def send_soon(self, calls: Sequence[PendingCall]) -> None:
        if calls:
            task = asyncio.create_task(self.send(calls))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def send(self, calls: Sequence[PendingCall]) -> None:
        """Send in order; stop at the first call that must be retried, so the rest keep their order."""
        for call in calls:
            try:
                if self._api is None:
                    log.info("local trial (no BOT_TOKEN), not sent: %s %s", call.method, call.params)
                else:
                    await self._api.call(call.method, call.params)
            except BotApiError as exc:
                retry_in = None if exc.permanent else (exc.retry_after or RETRY_DELAY)
                self._metrics.inc("replies_total", "failed" if retry_in is None else "retry")
                log.warning(
                    "outbox %d: %s (%s)", call.id, exc, "gave up" if retry_in is None else "will retry"
                )
                if retry_in is not None and exc.may_have_arrived:
                    # Telegram has no idempotency key: this is the one doubling window besides a crash.
                    log.warning(
                        "outbox %d: the first attempt may have reached Telegram; if it did, the retry"
                        " sends this reply twice",
                        call.id,
                    )
                await self._record(self._storage.mark_failed(call.id, str(exc), retry_in=retry_in), call)
                if retry_in is not None:
                    return
                continue
            except Exception:
                # A bug, not a Bot API answer. The call stays leased and is retried after the lease; the
                # task must not die with it (nobody awaits it, so nobody would hear of it).
                log.exception("outbox %d: unexpected error while sending; retried after the lease", call.id)
                return
            self._metrics.inc("replies_total", "sent")
            await self._record(self._storage.mark_sent(call.id), call)

    async def _record(self, marking: Awaitable[None], call: PendingCall) -> None:
        try:
            await marking
        except Exception as exc:
            # StorageUnavailable, or anything else: the send's result is what matters, and it is logged.
            log.warning("outbox %d: could not record the result (%s); it may be sent again", call.id, exc)

    async def sweep(self, limit: int = 100) -> int:
        """Send calls whose lease ran out (their sender crashed or failed). Returns how many were taken."""
        calls = await self._storage.claim_due(limit, self._lease)
        await self.send(calls)
        return len(calls)

    async def run_sweeper(self, interval: float) -> None:
        """Until cancelled: sweep every `interval` seconds, and prune old ids and sent calls hourly."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        while True:
            try:
                await self.sweep()
                if loop.time() >= next_prune:
                    pruned = await self._storage.prune(KEEP_UPDATES, KEEP_SENT)
                    log.debug("pruned %d old rows", pruned)
                    next_prune = loop.time() + 3600
            except StorageUnavailable as exc:
                log.warning("outbox sweeper: %s", exc)
            except Exception:
                # Whatever it was, the sweeper is the only thing that resends after a failure: it must
                # outlive it. Calls it had leased are tried again once their lease runs out.
                log.exception("outbox sweeper: this round failed and was skipped; trying again")
            await asyncio.sleep(interval)

    async def drain(self, within: float) -> None:
        """Wait for the sends under way (graceful shutdown); what does not finish is left leased."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within)
