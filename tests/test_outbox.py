"""The sender: Telegram's flood limits, 429 pauses, backoff and give-up, order within a chat, budgets
shared by processes. Driven by a fake clock (no sleeps) against real PostgreSQL and the fake Bot API,
which enforces the flood limits itself: a send over a limit would be answered 429 and not delivered."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import httpx
import pytest

from bot.metrics import Metrics
from bot.outbox import Limits, Outbox
from bot.storage import OutgoingCall, PendingCall, Storage
from bot.storage.postgres import PostgresStorage
from bot.telegram import BotApi
from bot.testing.env import TOKEN
from bot.testing.fake_telegram import FakeTelegram, FloodLimits, RecordedCall

pytestmark = pytest.mark.anyio

GROUP, OTHER_GROUP, USER = -1001, -1002, 42


class FakeClock:
    """Epoch seconds that move only when told; starts at the real time, as the database's rows do."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(fake: FakeTelegram) -> FakeClock:
    clock = FakeClock()
    fake.clock = clock.time
    fake.flood_limits = FloodLimits()
    return clock


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[PostgresStorage]:
    storage = await PostgresStorage.connect(database_url)
    try:
        yield storage
    finally:
        await storage.close()


@pytest.fixture
async def api(telegram_root: str) -> AsyncIterator[BotApi]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield BotApi(TOKEN, client, telegram_root)


def make_outbox(
    storage: Storage, api: BotApi, clock: FakeClock, metrics: Metrics | None = None, **limits: Any
) -> Outbox:
    return Outbox(
        storage, api, metrics or Metrics(), limits=Limits(**limits), clock=clock, rng=random.Random(1)
    )


async def queue(
    storage: Storage, chats: Sequence[int], *, update_id: int = 1, lease: float = 0
) -> list[PendingCall]:
    """Queue one message per chat id as an update's transaction does; lease 0: due for the sweeper now."""
    calls = [OutgoingCall("sendMessage", {"chat_id": c, "text": f"#{i}"}) for i, c in enumerate(chats)]
    async with storage.transaction() as tx:
        return await tx.enqueue(1, update_id, calls, lease)


async def run_for(outbox: Outbox, clock: FakeClock, seconds: float, tick: float = 0.1) -> None:
    """Sweep every `tick` of fake time, as the sweeper would wake up."""
    end = clock.now + seconds
    while clock.now < end:
        await outbox.sweep()
        clock.advance(tick)


def most_in_any_window(calls: list[RecordedCall], window: float) -> int:
    times = sorted(c.at for c in calls)
    return max((sum(1 for u in times[i:] if u < t + window) for i, t in enumerate(times)), default=0)


def texts(calls: list[RecordedCall]) -> list[str]:
    return [c.params["text"] for c in calls]


async def unsent(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT id, chat_key, attempts, extract(epoch FROM lease_until)::float8 AS due FROM outbox"
            " WHERE sent_at IS NULL AND failed_at IS NULL ORDER BY id"
        )
    finally:
        await conn.close()


# --- the limits ----------------------------------------------------------------------------------


async def test_a_private_chat_gets_at_most_one_send_a_second_in_order(
    storage: Storage, api: BotApi, clock: FakeClock, fake: FakeTelegram, database_url: str
) -> None:
    outbox = make_outbox(storage, api, clock)
    outbox.send_soon(await queue(storage, [USER] * 5, lease=30))
    await outbox.drain(10)
    assert len(fake.delivered(USER)) == 1  # the first at once; the rest wait in the outbox
    assert len(await unsent(database_url)) == 4
    await run_for(outbox, clock, 6)
    sent = fake.delivered(USER)
    assert texts(sent) == ["#0", "#1", "#2", "#3", "#4"]
    assert most_in_any_window(sent, 1.0) == 1
    assert len(fake.calls("sendMessage")) == 5  # none was refused by the fake's flood limit


async def test_a_group_gets_at_most_twenty_sends_a_minute(
    storage: Storage, api: BotApi, clock: FakeClock, fake: FakeTelegram
) -> None:
    outbox = make_outbox(storage, api, clock)
    await queue(storage, [GROUP] * 45)
    await run_for(outbox, clock, 150, tick=0.5)
    sent = fake.delivered(GROUP)
    assert texts(sent) == [f"#{i}" for i in range(45)]
    assert most_in_any_window(sent, 60.0) == 20
    assert len(fake.calls("sendMessage")) == 45


async def test_the_whole_bot_sends_at_most_thirty_a_second(
    storage: Storage, api: BotApi, clock: FakeClock, fake: FakeTelegram
) -> None:
    outbox = make_outbox(storage, api, clock)
    await queue(storage, [USER + i for i in range(120)])
    await run_for(outbox, clock, 6, tick=0.02)
    sent = fake.delivered()
    assert len(sent) == 120
    assert most_in_any_window(sent, 1.0) <= 30
    assert len(fake.calls("sendMessage")) == 120


async def test_limits_are_settings(
    storage: Storage, api: BotApi, clock: FakeClock, fake: FakeTelegram
) -> None:
    fake.flood_limits = None
    outbox = make_outbox(storage, api, clock, per_second=5, group_per_minute=4)
    await queue(storage, [GROUP] * 6 + [USER + i for i in range(1, 20)])
    await run_for(outbox, clock, 100, tick=0.05)
    assert most_in_any_window(fake.delivered(GROUP), 60.0) == 4
    assert most_in_any_window(fake.delivered(), 1.0) == 5
    assert len(fake.delivered()) == 25


# --- 429 --------------------------------------------------------------------------------------------


async def test_a_429_pauses_that_chat_only_and_its_calls_wait_in_the_outbox(
    storage: Storage, api: BotApi, clock: FakeClock, fake: FakeTelegram, database_url: str
) -> None:
    metrics = Metrics()
    outbox = make_outbox(storage, api, clock, metrics)
    fake.fail_next(
        "sendMessage", error_code=429, description="Too Many Requests", retry_after=10, chat_id=USER
    )
    first = await queue(storage, [USER], update_id=1, lease=30)
    second = await queue(storage, [USER, GROUP], update_id=2, lease=30)
    await outbox.send(first)
    await outbox.send(second)
    assert texts(fake.delivered()) == ["#1"]  # the group's reply went; the paused chat's did not
    waiting = await unsent(database_url)
    assert [r["chat_key"] for r in waiting] == [str(USER), str(USER)]
    assert waiting[0]["due"] >= clock.now + 10 - 0.01  # the 429's retry_after, kept in the database
    await run_for(outbox, clock, 9.5)
    assert texts(fake.delivered(USER)) == []
    await run_for(outbox, clock, 3)
    assert texts(fake.delivered(USER)) == ["#0", "#0"]  # the first, then the one queued behind it
    assert [c.params["text"] for c in fake.delivered(USER)] == ["#0", "#0"]
    assert metrics.count("bot_api_429_total", scope="chat") == 1
    assert metrics.count("bot_api_429_total", scope="bot") == 0


async def test_429s_in_two_chats_pause_every_send(
    storage: Storage, api: BotApi, clock: FakeClock, fake: FakeTelegram
) -> None:
    metrics = Metrics()
    outbox = make_outbox(storage, api, clock, metrics)
    for chat in (GROUP, OTHER_GROUP):
        fake.fail_next(
            "sendMessage", error_code=429, description="Too Many Requests", retry_after=20, chat_id=chat
        )
    await outbox.send(await queue(storage, [GROUP, OTHER_GROUP, USER], lease=30))
    assert fake.delivered() == []  # the third chat waits too: the bot itself is over the limit
    status = await storage.outbox_status(clock.now)
    assert status.unsent == 3
    assert status.paused_for == pytest.approx(20, abs=0.1)
    await run_for(outbox, clock, 19.5)
    assert fake.delivered() == []
    await run_for(outbox, clock, 1)
    assert sorted(c.params["chat_id"] for c in fake.delivered()) == [OTHER_GROUP, GROUP, USER]
    assert metrics.count("bot_api_429_total", scope="bot") == 1


# --- retries -----------------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    limits, rng = Limits(backoff_max=60), random.Random(3)
    for attempts, full in [(0, 1), (1, 2), (2, 4), (5, 32), (6, 60), (40, 60), (10_000, 60)]:
        for _ in range(50):
            assert full / 2 <= limits.backoff(attempts, rng) <= full


async def test_5xx_and_unreadable_answers_are_retried_with_growing_delays(
    storage: Storage, api: BotApi, clock: FakeClock, fake: FakeTelegram, database_url: str
) -> None:
    metrics = Metrics()
    outbox = make_outbox(storage, api, clock, metrics, backoff_max=8)
    fake.fail_next("sendMessage", times=3, error_code=500, chat_id=GROUP)
    fake.misbehave_next("sendMessage", "html_page", "truncated_json", "no_body")  # a proxy's answers
    await queue(storage, [GROUP])
    clock.advance(0.1)
    delays = []
    for _ in range(6):
        await outbox.sweep()
        [row] = await unsent(database_url)
        delays.append(row["due"] - clock.now)
        clock.now = row["due"]
    await outbox.sweep()
    assert texts(fake.delivered(GROUP)) == ["#0"]
    assert len(fake.calls("sendMessage")) == 7
    # 1, 2, 4, 8, 8, 8 s, each between half and all of it
    for delay, full in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert full / 2 - 0.1 <= delay <= full + 0.1
    assert metrics.count("bot_api_calls_total", method="sendMessage", outcome="retry") == 6


async def test_network_errors_are_retried(storage: Storage, clock: FakeClock, database_url: str) -> None:
    async with httpx.AsyncClient(timeout=2) as client:
        nowhere = BotApi(TOKEN, client, "http://127.0.0.1:9")  # nothing listens on the discard port
        outbox = make_outbox(storage, nowhere, clock)
        await queue(storage, [USER])
        # Past the row's due time (the database's now() at enqueue), however long the setup took on a
        # loaded machine: 0.1 s after the clock's creation was not always enough.
        clock.now = time.time() + 0.1
        await outbox.sweep()
    [row] = await unsent(database_url)
    assert row["attempts"] == 1
    assert clock.now + 0.5 <= row["due"] <= clock.now + 1


async def test_after_the_give_up_horizon_a_call_is_marked_failed_with_a_metric_and_a_log_line(
    storage: Storage,
    api: BotApi,
    clock: FakeClock,
    fake: FakeTelegram,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    outbox = make_outbox(storage, api, clock, metrics, give_up_after=120, backoff_max=30)
    fake.fail_next("sendMessage", times=1000, error_code=500, chat_id=GROUP)
    await queue(storage, [GROUP, GROUP], update_id=7)
    with caplog.at_level(logging.INFO, "bot.outbox"):
        await run_for(outbox, clock, 200, tick=1)
    tries = len(fake.calls("sendMessage"))
    assert 4 <= tries <= 12  # backed off, not every tick
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT failed_at IS NOT NULL AS failed, last_error FROM outbox ORDER BY id")
    finally:
        await conn.close()
    assert [r["failed"] for r in rows] == [True, True]  # the second waited behind the first, then gave up too
    assert rows[0]["last_error"].startswith("gave up after")
    assert metrics.count("bot_outbox_given_up_total", method="sendMessage") == 2
    assert "gave up on sendMessage to chat -1001" in caplog.text


async def test_a_permanent_error_fails_the_call_at_once_and_the_chat_goes_on(
    storage: Storage, api: BotApi, clock: FakeClock, fake: FakeTelegram
) -> None:
    metrics = Metrics()
    outbox = make_outbox(storage, api, clock, metrics)
    fake.fail_next("sendMessage", error_code=403, description="Forbidden: bot was blocked by the user")
    await outbox.send(await queue(storage, [GROUP, GROUP], lease=30))
    await run_for(outbox, clock, 5)
    assert texts(fake.delivered()) == ["#1"]
    assert len(fake.calls("sendMessage")) == 2
    assert metrics.count("bot_api_calls_total", method="sendMessage", outcome="failed") == 1


# --- several processes ------------------------------------------------------------------------------


async def test_two_processes_share_the_budgets_through_the_database(
    database_url: str, api: BotApi, clock: FakeClock, fake: FakeTelegram
) -> None:
    # Two pools are two sets of connections, as two processes would have: everything they share goes
    # through the database, since the Outbox objects share no memory.
    first = await PostgresStorage.connect(database_url)
    second = await PostgresStorage.connect(database_url)
    try:
        outboxes = [make_outbox(first, api, clock), make_outbox(second, api, clock)]
        for update_id in range(1, 21):
            calls = await queue(first, [USER, GROUP], update_id=update_id, lease=30)
            await outboxes[update_id % 2].send(calls)
        for _ in range(700):
            await asyncio.gather(*(o.sweep() for o in outboxes))
            clock.advance(0.1)
        assert len(fake.delivered(USER)) == 20 and len(fake.delivered(GROUP)) == 20
        assert most_in_any_window(fake.delivered(USER), 1.0) == 1
        assert most_in_any_window(fake.delivered(GROUP), 60.0) == 20
        assert texts(fake.delivered(USER)) == ["#0"] * 20  # and each chat's calls in queue order:
        assert [c.params["chat_id"] for c in fake.delivered(GROUP)] == [GROUP] * 20
        assert len(fake.calls("sendMessage")) == 40
    finally:
        await first.close()
        await second.close()
