"""`set-webhook`, `webhook-info` and `delete-webhook`: the webhook as Telegram holds it, looked at and
changed by hand (`serve` registers it by itself at start)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import httpx

from ..config import ConfigError, Settings, check_webhook_url
from ..runtime import bot_api
from ..telegram import BotApiError
from ..webhook import problems, registration
from .base import Fail, bot_to_run

__all__ = ["delete_webhook", "set_webhook", "webhook_info"]


async def _call(settings: Settings, method: str, params: dict[str, Any]) -> Any:
    if settings.bot_token is None:
        raise Fail(f"BOT_TOKEN: required for {method}")
    async with httpx.AsyncClient(timeout=settings.bot_api_timeout) as client:
        try:
            return await bot_api(settings, client, settings.bot_token).call(method, params)
        except BotApiError as exc:
            raise Fail(str(exc)) from exc


def set_webhook(settings: Settings, args: argparse.Namespace) -> int:
    try:
        # Checked as WEBHOOK_URL is: set by hand, a URL Telegram cannot deliver to is as silent.
        url = check_webhook_url("--url", args.url or "") or settings.webhook_url
    except ConfigError as exc:
        raise Fail(str(exc)) from None
    if url is None:
        raise Fail("WEBHOOK_URL: required for set-webhook (the public https URL of /webhook), or pass --url")
    params = registration(
        settings,
        url,
        # Only the kinds the app's handlers receive: Telegram sends nothing else, saving traffic both ways.
        bot_to_run(settings, args).allowed_updates(),
        max_connections=args.max_connections,
        drop_pending_updates=args.drop_pending_updates,
    )
    asyncio.run(_call(settings, "setWebhook", params))
    print(f"webhook set to {url}")
    return 0


def webhook_info(settings: Settings, args: argparse.Namespace) -> int:
    info = asyncio.run(_call(settings, "getWebhookInfo", {}))
    print(json.dumps(info, indent=2, ensure_ascii=False))
    found = problems(
        info,
        settings.webhook_url,
        bot_to_run(settings, args).allowed_updates(),
        own_urls=settings.own_webhook_urls,
    )
    for problem in found:
        print(f"! {problem}")
    if not found:
        print("ok: Telegram delivers to this configuration's URL, with no recent error")
    return 1 if found else 0


def delete_webhook(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(_call(settings, "deleteWebhook", {"drop_pending_updates": args.drop_pending_updates}))
    print("webhook deleted")
    return 0
