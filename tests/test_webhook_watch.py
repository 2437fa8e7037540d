"""bot/webhook_watch.py against the fake Bot API: Telegram's queue and last failure, as metrics and
warnings; and a served bot exporting them."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from bot.telegram import BotApi
from bot.testing.env import TOKEN
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import BotProcess
from bot.testing.updates import message_update
from bot.webhook_watch import WebhookWatch

pytestmark = pytest.mark.anyio

OURS = "https://bot.example.com/webhook"
NOW = 1_800_000_000.0


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def queue(fake: FakeTelegram, count: int, start: int = 1) -> None:
    """Updates Telegram holds because it could not deliver them."""
    for n in range(start, start + count):
        fake.push_update(message_update(n, -1, "🍕"))


@dataclass
class Watched:
    watch: WebhookWatch
    registry: CollectorRegistry
    client: httpx.AsyncClient  # for calls to the fake as Telegram's own side of things


@pytest.fixture
async def watched(telegram_root: str) -> AsyncIterator[Watched]:
    """A watch of this deployment (OURS), with a fixed clock, against the fake; not read yet."""
    async with httpx.AsyncClient() as client:
        registry = CollectorRegistry()
        api = BotApi(TOKEN, client, telegram_root)
        yield Watched(
            WebhookWatch(api, registry, [OURS], pending_warning=100, clock=lambda: NOW), registry, client
        )


def set_webhook(telegram_root: str, url: str) -> None:
    assert httpx.post(f"{telegram_root}/bot{TOKEN}/setWebhook", json={"url": url}).json()["ok"]


async def test_the_watch_exports_the_queue_and_the_last_failure(
    fake: FakeTelegram, telegram_root: str, watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    set_webhook(telegram_root, OURS)
    registry = watched.registry
    assert math.isnan(value(registry, "bot_webhook_pending_updates") or 0.0)  # not read yet: unknown

    await watched.watch.read()  # all well
    assert value(registry, "bot_webhook_pending_updates") == 0
    assert value(registry, "bot_webhook_last_error_age_seconds") == math.inf
    assert value(registry, "bot_webhook_last_error_info", message="") == 1

    queue(fake, 150)
    message = "Wrong response from the webhook: 503 Service Unavailable"
    fake.webhook_failed(message, at=NOW - 120)
    with caplog.at_level(logging.WARNING, logger="bot.webhook_watch"):
        await watched.watch.read()
    assert value(registry, "bot_webhook_pending_updates") == 150
    assert value(registry, "bot_webhook_last_error_age_seconds") == 120
    assert value(registry, "bot_webhook_last_error_info", message=message) == 1
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("150 updates wait at Telegram for delivery and are not going down")
    assert warning.endswith(f"last delivery failed 120 s ago: {message}")


async def test_a_queue_that_drains_is_not_warned_about(
    fake: FakeTelegram, telegram_root: str, watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    set_webhook(telegram_root, OURS)
    queue(fake, 300)
    await watched.watch.read()
    caplog.clear()
    # Telegram delivers; the queue shrinks but is still over the threshold.
    telegram = f"{telegram_root}/bot{TOKEN}"
    await watched.client.post(f"{telegram}/deleteWebhook", json={})
    await watched.client.get(f"{telegram}/getUpdates", params={"offset": 151})  # confirms 1-150
    await watched.client.post(f"{telegram}/setWebhook", json={"url": OURS})
    with caplog.at_level(logging.WARNING, logger="bot.webhook_watch"):
        await watched.watch.read()
    assert value(watched.registry, "bot_webhook_pending_updates") == 150
    assert caplog.records == []


async def test_a_webhook_moved_elsewhere_and_a_failed_read_are_said(
    fake: FakeTelegram, telegram_root: str, watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    set_webhook(telegram_root, "https://staging.example.com/webhook")
    with caplog.at_level(logging.WARNING, logger="bot.webhook_watch"):
        await watched.watch.read()
        fake.fail_next("getWebhookInfo", error_code=502, description="Bad Gateway")
        await watched.watch.read()
    messages = [r.getMessage() for r in caplog.records]
    assert "now delivers this bot's updates to https://staging.example.com/webhook" in messages[0]
    assert messages[1].startswith("webhook watch: getWebhookInfo failed")
    assert math.isnan(value(watched.registry, "bot_webhook_pending_updates") or 0.0)


def test_serve_exports_telegram_s_queue_on_metrics(
    serve_bot: Callable[..., BotProcess], fake: FakeTelegram
) -> None:
    fake.webhook_failed("Connection timed out")
    bot = serve_bot(METRICS_TOKEN="scrape-token-0123456789", WEBHOOK_WATCH_INTERVAL="0.2")
    queue(fake, 3)
    headers = {"authorization": "Bearer scrape-token-0123456789"}

    def scraped() -> dict[str, float]:
        text = httpx.get(bot.url + "/metrics", headers=headers).text
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("bot_webhook_")
        }

    deadline = time.monotonic() + 20
    while scraped().get("bot_webhook_pending_updates") != 3:
        assert time.monotonic() < deadline, scraped()
        time.sleep(0.1)
    assert 0 <= scraped()["bot_webhook_last_error_age_seconds"] < 3600
