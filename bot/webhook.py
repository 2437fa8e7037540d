"""Telegram's side of the webhook: registering ours, and reading what Telegram says about it.

`serve` registers the webhook at every start, so a new hostname, a changed WEBHOOK_SECRET or a new
handler's update type reaches Telegram without anyone running `set-webhook`. setWebhook replaces the
whole registration and is idempotent: instances starting together all send the same parameters, and
whichever call lands last leaves the same registration as the first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from .config import Settings
from .telegram import BotApi, BotApiError

__all__ = ["RECENT_ERROR", "SECRET_HEADER", "foreign_webhook", "problems", "register", "registration"]

log = logging.getLogger("bot.webhook")

# Where Telegram puts setWebhook's secret_token in every delivery.
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 (a header name, not a secret)

# A delivery error Telegram reports from longer ago than this is history, not a current problem.
RECENT_ERROR = 3600.0


def registration(
    settings: Settings,
    url: str,
    allowed_updates: list[str],
    *,
    max_connections: int | None = None,
    drop_pending_updates: bool = False,
) -> dict[str, Any]:
    """setWebhook's parameters for this configuration."""
    return {
        "url": url,
        "secret_token": settings.webhook_secret,
        "max_connections": max_connections or settings.webhook_max_connections,
        "allowed_updates": allowed_updates,
        "drop_pending_updates": drop_pending_updates,
    }


async def register(api: BotApi, params: dict[str, Any], *, attempts: int = 4) -> None:
    """setWebhook, waiting out Telegram's flood limit (instances starting together may hit it), but
    never longer than one call may take: a start-up that would wait longer fails instead, in one line."""
    for attempt in range(attempts):
        try:
            await api.call("setWebhook", params)
            return
        except BotApiError as exc:
            wait = exc.retry_after or 1
            if exc.error_code != 429 or attempt == attempts - 1 or wait > api.timeout:
                raise
            log.info("setWebhook: flood limit, trying again in %g s", wait)
            await asyncio.sleep(wait)


def foreign_webhook(info: dict[str, Any], own_urls: Sequence[str]) -> str | None:
    """The URL Telegram delivers to, when it belongs to another deployment: set, and on none of the hosts
    this one answers at (its WEBHOOK_URL, its platform's addresses). Registering over it would take that
    deployment's updates (a review app given the production token), so `serve` leaves it to an explicit
    `set-webhook`. None when there is none, or it is this deployment's own to move (a new path, the
    platform's address replaced by a custom domain)."""
    current = str(info.get("url") or "")
    if not current:
        return None
    hosts = {urlsplit(url).netloc.lower() for url in own_urls}
    return None if urlsplit(current).netloc.lower() in hosts else current


def problems(
    info: dict[str, Any],
    ours: str | None,
    allowed_updates: list[str],
    now: float | None = None,
    own_urls: Sequence[str] = (),
) -> list[str]:
    """What getWebhookInfo shows to be wrong for this configuration, one sentence each. `own_urls`: every
    URL this deployment answers at (`Settings.own_webhook_urls`), `ours` when empty."""
    now = time.time() if now is None else now
    found = []
    url = info.get("url") or ""
    if not url:
        found.append("no webhook is set: Telegram delivers nothing (start `serve` or run `set-webhook`)")
    elif ours is not None and url != ours:
        if foreign_webhook(info, own_urls or [ours]):  # (what `serve` does at start depends on it)
            fix = "another host's, which `serve` leaves alone; `set-webhook` moves it here"
        else:
            fix = "restart `serve` or run `set-webhook` to move it"
        found.append(f"Telegram calls {url}, not our {ours}: {fix}")
    error_at = info.get("last_error_date")
    if error_at and now - error_at < RECENT_ERROR:
        minutes = int((now - error_at) // 60)
        found.append(
            f"the last delivery failed {minutes} min ago: {info.get('last_error_message', 'no message')}"
            " (401 means WEBHOOK_SECRET changed since the webhook was set)"
        )
    pending = info.get("pending_update_count") or 0
    if pending:
        found.append(f"{pending} update(s) are waiting to be delivered")
    registered = info.get("allowed_updates")
    if url and registered is not None and sorted(registered) != sorted(allowed_updates):
        found.append(f"Telegram sends {registered}, the bot handles {allowed_updates}")
    return found
