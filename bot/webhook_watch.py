"""Telegram's side of delivery, watched: `serve` reads getWebhookInfo every WEBHOOK_WATCH_INTERVAL.

What Telegram holds back never reaches the bot, so no log or metric of ours can show it: updates it
could not deliver (our 503s, timeouts, a wrong secret, a host that is down) wait in its queue, and the
last failure is reported only there. This reads it and exports it for /metrics:

- bot_webhook_pending_updates: updates Telegram holds for delivery (pending_update_count);
- bot_webhook_last_error_age_seconds: since its last failed delivery (+Inf: none reported);
- bot_webhook_last_error_info{message=...}: what that failure was;

and logs a warning when the queue is at least WEBHOOK_PENDING_WARNING and not shrinking, or when
Telegram delivers to another deployment's host. Every process reads it (one call per interval), so any
process's /metrics has it; a read that fails leaves the gauges NaN until the next one succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Info

from .config import Settings
from .telegram import BotApi, BotApiError
from .webhook import foreign_webhook

__all__ = ["WebhookWatch", "watching"]

log = logging.getLogger("bot.webhook_watch")


class WebhookWatch:
    def __init__(
        self,
        api: BotApi,
        registry: CollectorRegistry,
        own_urls: Sequence[str],
        *,
        pending_warning: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._own_urls = own_urls
        self._pending_warning = pending_warning
        self._clock = clock
        self._previous: int | None = None
        self.pending = Gauge(
            "bot_webhook_pending_updates",
            "Updates Telegram holds for delivery to the webhook (getWebhookInfo's pending_update_count).",
            registry=registry,
        )
        self.error_age = Gauge(
            "bot_webhook_last_error_age_seconds",
            "Seconds since Telegram's last failed delivery to the webhook; +Inf when it reports none.",
            registry=registry,
        )
        self.error = Info(
            "bot_webhook_last_error", "Telegram's message for its last failed delivery.", registry=registry
        )
        self._unknown()

    def _unknown(self) -> None:
        self.pending.set(math.nan)
        self.error_age.set(math.nan)
        self.error.info({"message": ""})

    async def run(self, interval: float) -> None:
        """Read now, then every `interval` seconds, until cancelled."""
        while True:
            await self.read()
            await asyncio.sleep(interval)

    async def read(self) -> None:
        """One getWebhookInfo: the gauges, and a warning when updates pile up or go elsewhere."""
        try:
            info: dict[str, Any] = await self._api.call("getWebhookInfo", {})
        except BotApiError as exc:
            log.warning("webhook watch: getWebhookInfo failed, delivery state unknown: %s", exc)
            self._unknown()
            return
        pending = int(info.get("pending_update_count") or 0)
        failed_at = info.get("last_error_date")
        message = str(info.get("last_error_message") or "") if failed_at else ""
        self.pending.set(pending)
        self.error_age.set(max(0.0, self._clock() - failed_at) if failed_at else math.inf)
        self.error.info({"message": message})
        if pending >= self._pending_warning and (self._previous is None or pending >= self._previous):
            log.warning(
                "%d updates wait at Telegram for delivery and are not going down%s",
                pending,
                f"; its last delivery failed {self._clock() - failed_at:.0f} s ago: {message}"
                if failed_at
                else "",
            )
        self._previous = pending
        elsewhere = foreign_webhook(info, self._own_urls) if self._own_urls else None
        if elsewhere is not None:
            log.warning("Telegram now delivers this bot's updates to %s, not to this deployment", elsewhere)


@asynccontextmanager
async def watching(
    settings: Settings, api: BotApi | None, registry: CollectorRegistry
) -> AsyncIterator[WebhookWatch | None]:
    """The watch, running in the background, for a bot with a token (the local trial has no webhook);
    None when there is nothing to watch or WEBHOOK_WATCH_INTERVAL is 0."""
    if api is None or settings.bot_token is None or not settings.webhook_watch_interval:
        yield None
        return
    watch = WebhookWatch(
        api, registry, settings.own_webhook_urls, pending_warning=settings.webhook_pending_warning
    )
    task = asyncio.create_task(watch.run(settings.webhook_watch_interval))
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
