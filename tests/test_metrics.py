"""GET /metrics: who may read it, and what it says, read back with Prometheus' own text parser."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bot.app import SECRET_HEADER
from bot.apps.pizza_testing import PIZZA, hunger
from bot.metrics import UPDATE_KINDS, UPDATE_OUTCOMES, _Histogram, _UpdateCounter
from bot.testing.env import SECRET, make_settings
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.updates import encode, message_update

pytestmark = pytest.mark.anyio

OpenClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
METRICS_TOKEN = "scrape-token-0123456789"
BEARER = {"authorization": f"Bearer {METRICS_TOKEN}"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


async def scrape_until(client: httpx.AsyncClient, done: Callable[[Samples], bool]) -> Samples:
    """Metrics once `done` holds: replies are sent, and their outcome recorded, after the 200."""
    for _ in range(200):
        samples = parse((await client.get("/metrics", headers=BEARER)).text)
        if done(samples):
            return samples
        await asyncio.sleep(0.05)
    raise AssertionError("the metrics never showed what was waited for")


async def post(client: httpx.AsyncClient, update: dict[str, object]) -> int:
    headers = {SECRET_HEADER: SECRET, "content-type": "application/json"}
    return (await client.post("/webhook", content=encode(update), headers=headers)).status_code


async def test_metrics_are_not_served_without_a_token_or_a_port(
    open_client: OpenClient, database_url: str, telegram_root: str
) -> None:
    async with open_client(make_settings(database_url, telegram_root)) as client:
        assert (await client.get("/metrics")).status_code == 404
        assert (await client.get("/metrics", headers=BEARER)).status_code == 404


async def test_metrics_need_the_bearer_token(
    open_client: OpenClient, database_url: str, telegram_root: str
) -> None:
    settings = make_settings(database_url, telegram_root, METRICS_TOKEN=METRICS_TOKEN)
    async with open_client(settings) as client:
        assert (await client.get("/metrics")).status_code == 401
        wrong = await client.get("/metrics", headers={"authorization": "Bearer not-the-token-at-all"})
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert METRICS_TOKEN not in wrong.text
        right = await client.get("/metrics", headers=BEARER)
        assert right.status_code == 200
        assert right.headers["content-type"].startswith("text/plain")


async def test_counters_read_zero_before_first_use(
    open_client: OpenClient, database_url: str, telegram_root: str
) -> None:
    settings = make_settings(database_url, telegram_root, METRICS_TOKEN=METRICS_TOKEN)
    async with open_client(settings) as client:
        samples = parse((await client.get("/metrics", headers=BEARER)).text)
    for kind in UPDATE_KINDS:
        for outcome in UPDATE_OUTCOMES:
            assert value(samples, "bot_updates_total", kind=kind, outcome=outcome) == 0
    for outcome in ("sent", "retry", "failed", "rate_limited", "moved"):
        assert value(samples, "bot_api_calls_total", method="sendMessage", outcome=outcome) == 0
    assert value(samples, "bot_api_429_total", scope="chat") == 0
    assert value(samples, "bot_api_429_total", scope="bot") == 0
    assert value(samples, "bot_outbox_given_up_total", method="sendMessage") == 0
    assert value(samples, "bot_update_duration_seconds_count") == 0
    assert value(samples, "bot_outbox_unsent") == 0
    assert value(samples, "bot_outbox_oldest_unsent_age_seconds") == 0
    assert value(samples, "bot_send_pause_seconds") == 0


async def test_traffic_shows_in_updates_latency_waits_and_bot_api_calls(
    open_client: OpenClient, database_url: str, telegram_root: str, fake: FakeTelegram
) -> None:
    # The locking mode: the optimistic one (the default) reads without a lock, so it has no lock waits.
    settings = make_settings(
        database_url, telegram_root, METRICS_TOKEN=METRICS_TOKEN, DB_CONCURRENCY="locked"
    )
    async with open_client(settings) as client:
        assert await post(client, message_update(1, -5, PIZZA)) == 200
        assert await post(client, message_update(1, -5, PIZZA)) == 200  # a redelivery
        assert await post(client, hunger(2, -5)) == 200
        assert await post(
            client, {"update_id": 3, "edited_message": message_update(3, -5, PIZZA).json()["message"]}
        )
        await fake.wait_for_async(lambda: len(fake.delivered()) == 1)
        samples = await scrape_until(client, lambda s: value(s, "bot_outbox_unsent") == 0)
    assert value(samples, "bot_updates_total", kind="message", outcome="applied") == 2
    assert value(samples, "bot_updates_total", kind="message", outcome="duplicate") == 1
    assert value(samples, "bot_updates_total", kind="edited_message", outcome="ignored") == 1
    assert value(samples, "bot_update_duration_seconds_count") == 4
    assert value(samples, "bot_update_duration_seconds_bucket", le="+Inf") == 4
    assert value(samples, "bot_lock_wait_seconds_count") == 2  # the pizza and the /hunger
    # Not the redelivery: the process applied it and it queued nothing, so it is answered from memory.
    assert value(samples, "bot_pool_wait_seconds_count") == 2
    assert value(samples, "bot_api_calls_total", method="sendMessage", outcome="sent") == 1


async def test_backlog_oldest_age_and_pause_are_read_at_scrape_time(
    open_client: OpenClient, database_url: str, telegram_root: str, fake: FakeTelegram
) -> None:
    settings = make_settings(database_url, telegram_root, METRICS_TOKEN=METRICS_TOKEN)
    for chat in (-6, -7):
        fake.fail_next(
            "sendMessage", error_code=429, description="Too Many Requests", retry_after=60, chat_id=chat
        )
    async with open_client(settings) as client:
        assert await post(client, hunger(1, -6)) == 200
        await scrape_until(client, lambda s: value(s, "bot_api_429_total", scope="chat") == 1)
        assert await post(client, hunger(2, -7)) == 200
        await scrape_until(client, lambda s: value(s, "bot_api_429_total", scope="chat") == 2)
        assert await post(client, hunger(3, -8)) == 200
        # Both: the call is counted when Telegram answers, its row marked sent a moment later.
        samples = await scrape_until(
            client,
            lambda s: (
                value(s, "bot_api_calls_total", method="sendMessage", outcome="sent") == 1
                and value(s, "bot_outbox_unsent") <= 2
            ),
        )
    assert value(samples, "bot_api_calls_total", method="sendMessage", outcome="rate_limited") == 2
    assert value(samples, "bot_api_429_total", scope="bot") == 0  # two chats, a bot sending little
    assert value(samples, "bot_outbox_unsent") == 2  # the paused chats' replies wait their minute
    assert 0 <= value(samples, "bot_outbox_oldest_unsent_age_seconds") < 60
    assert value(samples, "bot_send_pause_seconds") == 0
    assert value(samples, "bot_send_paused_chats") == 2
    assert [m["chat"]["id"] for m in fake.delivered_messages()] == [-8]


DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "bot.json"


async def test_the_grafana_dashboard_names_only_metrics_the_bot_serves(
    open_client: OpenClient, database_url: str, telegram_root: str
) -> None:
    settings = make_settings(database_url, telegram_root, METRICS_TOKEN=METRICS_TOKEN)
    async with open_client(settings) as client:
        scraped = (await client.get("/metrics", headers=BEARER)).text
    served = {s.name for family in text_string_to_metric_families(scraped) for s in family.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert queries
    for query in queries:
        named = set(re.findall(r"\bbot_\w+", query))
        assert named, f"{query!r} reads none of our metrics"
        assert named <= served, f"{query!r} names {named - served}, which /metrics does not serve"


def exposed(registry: CollectorRegistry) -> str:
    """The registry in Prometheus' text format, each `_created` timestamp blanked (they differ by when)."""
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", generate_latest(registry).decode())


@pytest.fixture(params=[True, False], ids=["created-series", "no-created-series"])
def created_series(request: pytest.FixtureRequest) -> Iterator[bool]:
    """With prometheus_client's `_created` samples on (its default), and off (disable_created_metrics)."""
    if not request.param:
        prometheus_client.disable_created_metrics()
    try:
        yield request.param
    finally:
        prometheus_client.enable_created_metrics()


@pytest.mark.usefixtures("created_series")
def test_the_per_update_metrics_are_exposed_as_prometheus_client_exposes_them() -> None:
    # Our own collectors, for their cost (bot.metrics), against prometheus_client's own classes fed the
    # same: bounds exactly, between, below the first and past the last, an integer bound, and updates
    # of two kinds and outcomes among the counter's pairs that read 0; with and without `_created`.
    buckets = (0.001, 0.01, 1, 2.5)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = _Histogram("h_seconds", "A histogram.", buckets, ours)
    reference = Histogram("h_seconds", "A histogram.", buckets=buckets, registry=theirs)
    updates = _UpdateCounter(ours)
    counter = Counter(
        "bot_updates", "Updates received, by kind and outcome.", ["kind", "outcome"], registry=theirs
    )
    for kind in UPDATE_KINDS:
        for outcome in UPDATE_OUTCOMES:
            counter.labels(kind, outcome)
    for amount in (-1.0, 0.0, 0.0005, 0.001, 0.002, 0.01, 0.5, 1, 1.0000001, 2.5, 3, 1e9):
        histogram.observe(amount)
        reference.observe(amount)
    for pair in [("message", "applied")] * 3 + [("callback_query", "unavailable")]:
        updates.counts[pair] += 1
        counter.labels(*pair).inc()
    assert exposed(ours) == exposed(theirs)
