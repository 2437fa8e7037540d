"""Registering the webhook and reading Telegram's view of it (bot/webhook.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from bot.telegram import BotApi, BotApiError
from bot.testing.env import TOKEN, make_settings
from bot.testing.fake_telegram import FakeTelegram
from bot.webhook import RECENT_ERROR, foreign_webhook, problems, register, registration

OURS = "https://bot.example.com/webhook"
NOW = 1_800_000_000.0


def test_registration_carries_the_secret_and_the_bot_s_update_types() -> None:
    settings = make_settings("postgresql://u@db/bot", "http://fake", WEBHOOK_MAX_CONNECTIONS="12")
    params = registration(settings, OURS, ["message"])
    assert params == {
        "url": OURS,
        "secret_token": settings.webhook_secret,
        "max_connections": 12,
        "allowed_updates": ["message"],
        "drop_pending_updates": False,
    }


def info(**fields: Any) -> dict[str, Any]:
    return {"url": OURS, "pending_update_count": 0, "allowed_updates": ["message"], **fields}


@pytest.mark.parametrize(
    ("reported", "flagged"),
    [
        (info(), []),
        (info(url=""), ["no webhook is set"]),
        # Another host: `serve` would not take it over at its next start (a review app given production's
        # token), so restarting it is not the fix to suggest; a path of our own host, `serve` moves.
        (
            info(url="https://old.example.com/webhook"),
            ["Telegram calls https://old.example.com/webhook, not our", "another host's"],
        ),
        (
            info(url="https://bot.example.com/old-hook"),
            ["Telegram calls https://bot.example.com/old-hook, not our", "restart `serve`"],
        ),
        (
            info(last_error_date=NOW - 120, last_error_message="Wrong response from the webhook: 401"),
            ["the last delivery failed 2 min ago: Wrong response from the webhook: 401"],
        ),
        (info(last_error_date=NOW - RECENT_ERROR - 1, last_error_message="old news"), []),
        (info(pending_update_count=5), ["5 update(s) are waiting"]),
        (
            info(allowed_updates=["message", "callback_query"]),
            ["Telegram sends ['message', 'callback_query']"],
        ),
    ],
)
def test_problems_flags_what_differs_from_our_configuration(
    reported: dict[str, Any], flagged: list[str]
) -> None:
    found = problems(reported, OURS, ["message"], now=NOW)
    assert len(found) == (1 if flagged else 0)
    for sentence in found:
        start, *rest = flagged
        assert sentence.startswith(start)
        assert all(part in sentence for part in rest), sentence


@pytest.mark.anyio
async def test_register_waits_out_a_flood_limit_and_gives_up_on_a_refusal(
    fake: FakeTelegram, telegram_root: str
) -> None:
    async with httpx.AsyncClient() as client:
        api = BotApi(TOKEN, client, telegram_root)
        fake.fail_next(
            "setWebhook", error_code=429, description="Too Many Requests: retry after 1", retry_after=1
        )
        await register(api, {"url": OURS})
        assert len(fake.calls("setWebhook")) == 2
        assert fake.webhook["url"] == OURS
        with pytest.raises(BotApiError, match="An HTTPS URL must be provided"):
            await register(api, {"url": "http://plain.example.com/webhook"})
        assert len(fake.calls("setWebhook")) == 3  # a refusal is not retried
        # A flood limit longer than a call may take ends the start-up in one line, not in a silent wait.
        fake.fail_next(
            "setWebhook", error_code=429, description="Too Many Requests: retry after 600", retry_after=600
        )
        with pytest.raises(BotApiError, match="retry after 600"):
            await asyncio.wait_for(register(api, {"url": OURS}), 10)
        assert len(fake.calls("setWebhook")) == 4


@pytest.mark.parametrize(
    ("registered", "foreign"),
    [
        ("", False),  # nothing registered: ours to register
        (OURS, False),
        ("https://BOT.example.com/other-path", False),  # our host, another path: ours to move
        ("https://app-1a2b.herokuapp.com/webhook", False),  # the platform's address, now a custom domain
        ("https://app-pr-7.herokuapp.com/webhook", True),  # a review app got there first
        ("https://bot.example.com:8443/webhook", True),  # another port is another server
    ],
)
def test_a_webhook_on_none_of_our_hosts_is_another_deployment_s(registered: str, foreign: bool) -> None:
    own = [OURS, "https://app-1a2b.herokuapp.com/webhook"]
    assert foreign_webhook({"url": registered}, own) == (registered if foreign else None)
