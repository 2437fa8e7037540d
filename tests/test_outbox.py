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
from bot.storage import OutgoingCall, PendingCall, Storage, StorageUnavailable
from bot.storage.postgres import PostgresStorage
from bot.telegram import BotApi
from bot.testing.env import TOKEN
from bot.testing.fake_telegram import FakeTelegram, FloodLimits, RecordedCall

pytestmark = pytest.mark.anyio

GROUP, OTHER_GROUP, THIRD_GROUP, USER = -1001, -1002, -1003, 42


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
async def another_process(database_url: str) -> AsyncIterator[PostgresStorage]:
    """A second pool on the test's database: another process's connections. The Outbox objects share no
    memory, so whatever two of them share goes through the database."""
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


async def sweep(outbox: Outbox) -> None:
    """One pass of the sweeper, and the sends it started (they run in the background)."""
    await outbox.sweep()
    await outbox.drain(10)


async def run_for(outbox: Outbox, clock: FakeClock, seconds: float, tick: float = 0.1) -> None:
    """Sweep every `tick` of fake time, as the sweeper would wake up."""
    end = clock.now + seconds
    while clock.now < end:
        await sweep(outbox)
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


async def test_a_429_asking_for_an_absurd_wait_pauses_its_chat_no_longer_than_a_call_is_kept(
    storage: PostgresStorage,
    api: BotApi,
    clock: FakeClock,
    fake: FakeTelegram,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """retry_after 1e300 (a proxy's or Telegram's own bug): the pause's end overflowed PostgreSQL's
    timestamps, so every reservation of the chat's calls failed, logged as an unexpected error after each
    lease, and no call to the chat was ever given up on or sent again. A pause is at most OUTBOX_GIVE_UP
    now: the call is given up on then, and the chat's pause is over."""
    caplog.set_level(logging.WARNING)
    fake.fail_next(
        "sendMessage", error_code=429, description="Too Many Requests", retry_after=10**300, chat_id=GROUP
    )
    outbox = make_outbox(storage, api, clock, give_up_after=60)
    await queue(storage, [GROUP, OTHER_GROUP])
    await run_for(outbox, clock, 65, tick=1)
    assert texts(fake.delivered()) == ["#1"]  # the other group's, at once
    assert "gave up on sendMessage to chat -1001" in caplog.text
    assert "unexpected error" not in caplog.text
    paused_until = await storage.pool.fetchval(
        "SELECT paused_until FROM send_budget WHERE key = $1", str(GROUP)
    )
    assert paused_until <= clock.now


async def too_many_requests(fake: FakeTelegram, chat: int, retry_after: int) -> None:
    fake.fail_next(
        "sendMessage",
        error_code=429,
        description=f"Too Many Requests: retry after {retry_after}",
        retry_after=retry_after,
        chat_id=chat,
    )


async def whole_bot_pause(database_url: str) -> float:
    """Until when every send is paused, as the database keeps it (what a restart finds)."""
    conn = await asyncpg.connect(database_url)
    try:
        until: float | None = await conn.fetchval("SELECT paused_until FROM send_budget WHERE key = '*'")
    finally:
        await conn.close()
    return until or 0.0


async def test_an_hour_long_429_in_two_chats_pauses_those_two_and_no_other(
    storage: Storage,
    another_process: PostgresStorage,
    api: BotApi,
    clock: FakeClock,
    fake: FakeTelegram,
    database_url: str,
) -> None:
    # The case: retry_after=3600 for chat A, then for chat B, used to pause every send for an
    # hour, in the database, so that a restart did not end it either.
    metrics = Metrics()
    outbox = make_outbox(storage, api, clock, metrics)
    for chat in (GROUP, OTHER_GROUP):
        await too_many_requests(fake, chat, 3600)
    await outbox.send(await queue(storage, [GROUP, OTHER_GROUP, USER], lease=30))
    assert [c.params["chat_id"] for c in fake.delivered()] == [USER]
    status = await storage.outbox_status(clock.now)
    assert (status.paused_for, status.paused_chats, status.unsent) == (0, 2, 2)
    assert await whole_bot_pause(database_url) <= clock.now
    # Healthy chats go on getting their replies at once, minute after minute, and after a restart.
    restarted = make_outbox(another_process, api, clock, metrics)
    for minute, sender in enumerate([outbox, outbox, restarted], 1):
        clock.advance(60)
        await sender.send(await queue(storage, [USER, THIRD_GROUP], update_id=1 + minute, lease=30))
        assert len(fake.delivered(USER)) == minute + 1
        assert len(fake.delivered(THIRD_GROUP)) == minute
    assert fake.delivered(GROUP) == fake.delivered(OTHER_GROUP) == []  # theirs wait out their hour
    assert metrics.count("bot_api_429_total", scope="chat") == 2
    assert metrics.count("bot_api_429_total", scope="bot") == 0


async def test_429s_in_three_chats_while_the_bot_sends_near_its_budget_pause_every_send_for_seconds(
    storage: Storage, api: BotApi, clock: FakeClock, fake: FakeTelegram, database_url: str
) -> None:
    metrics = Metrics()
    outbox = make_outbox(storage, api, clock, metrics)
    groups = [GROUP, OTHER_GROUP, THIRD_GROUP]
    for chat in groups:
        await too_many_requests(fake, chat, 3600)
    # Two seconds of private replies at the whole bot's budget (about 25 a second), then the three
    # groups, each answered 429, then more private replies.
    await queue(storage, [USER + n for n in range(50)] + groups + [USER + n for n in range(50, 70)])
    await run_for(outbox, clock, 2.5, tick=0.02)
    assert metrics.count("bot_api_429_total", scope="bot") == 1  # the third group's: now it is evidence
    paused_at = clock.now
    delivered = len(fake.delivered())
    assert 50 <= delivered < 70
    until = await whole_bot_pause(database_url)
    assert paused_at < until <= paused_at + 30  # SEND_PAUSE_MAX, not the 429's hour
    await run_for(outbox, clock, until - clock.now - 0.1, tick=0.5)
    assert len(fake.delivered()) == delivered  # paused: the bot itself is over the limit
    await run_for(outbox, clock, 2, tick=0.05)
    assert len(fake.delivered()) == 70  # every private chat had its reply; the groups wait their hour
    assert sorted(c.params["chat_id"] for c in fake.delivered()) == [USER + n for n in range(70)]
    assert len(fake.calls("sendMessage")) == 73  # and none was refused by the fake's flood limits


# --- slow, stuck and moved chats ----------------------------------------------------------------------


async def test_a_stuck_send_holds_up_neither_the_sweeper_nor_other_chats(
    storage: Storage, api: BotApi, clock: FakeClock, fake: FakeTelegram, database_url: str
) -> None:
    # Headers at once, then a byte every 0.2 s: each read is quick, so only a total deadline ends it
    # (the client's is 30 s here; close() cuts it short at the end).
    fake.trickle_interval = 0.2
    fake.misbehave_next("sendMessage", "trickle")
    outbox = make_outbox(storage, api, clock)
    await queue(storage, [GROUP])
    clock.advance(1)  # past the lease the database gave from its own clock
    async with asyncio.timeout(10):  # the sweeper used to wait for its sends: here, for ever
        await outbox.sweep()
        await fake.wait_for_async(lambda: fake.most_at_once("sendMessage") == 1)
        await queue(storage, [OTHER_GROUP, USER], update_id=2)
        clock.advance(1)
        await outbox.sweep()
        await fake.wait_for_async(lambda: len(fake.delivered()) == 2)
        # Its lease holds while it is in flight: the sweeper does not take it again.
        clock.advance(20)
        await outbox.sweep()
        # An update's replies to two chats: the stuck one holds up only its own.
        fake.misbehave_next("sendMessage", "trickle", chat_id=THIRD_GROUP)
        outbox.send_soon(await queue(storage, [THIRD_GROUP, USER + 1], update_id=3, lease=30))
        await fake.wait_for_async(lambda: len(fake.delivered()) == 3)
        await outbox.close(0.1)  # a shutdown cuts the stuck ones short...
    assert sorted(c.params["chat_id"] for c in fake.delivered()) == [OTHER_GROUP, USER, USER + 1]
    assert len(fake.calls("sendMessage")) == 5
    # ...and the next start retries them.
    assert [(r["chat_key"], r["attempts"]) for r in await unsent(database_url)] == [
        (str(GROUP), 1),
        (str(THIRD_GROUP), 1),
    ]


async def test_a_reply_to_a_group_that_became_a_supergroup_goes_to_the_new_chat_in_order(
    storage: Storage, api: BotApi, clock: FakeClock, fake: FakeTelegram
) -> None:
    supergroup = -1009
    fake.migrated[GROUP] = supergroup
    metrics = Metrics()
    outbox = make_outbox(storage, api, clock, metrics)
    await queue(storage, [supergroup], update_id=1)  # one waiting for the new chat already
    await outbox.send(await queue(storage, [GROUP, USER, GROUP], update_id=2, lease=30))
    await run_for(outbox, clock, 5)
    assert texts(fake.delivered(supergroup)) == ["#0", "#0", "#2"]  # queue order, the old chat's moved
    assert texts(fake.delivered(USER)) == ["#1"]
    await queue(storage, [GROUP], update_id=3)  # queued for the old id after the move: it follows too
    await run_for(outbox, clock, 5)
    assert texts(fake.delivered(supergroup)) == ["#0", "#0", "#2", "#0"]
    assert fake.delivered(GROUP) == []
    assert metrics.count("bot_api_calls_total", method="sendMessage", outcome="moved") == 2
    assert metrics.count("bot_api_calls_total", method="sendMessage", outcome="failed") == 0


class ForgetfulStorage(PostgresStorage):
    """PostgreSQL whose mark_sent fails the first `failures` times (the database away for a moment)."""

    failures = 0

    async def mark_sent(self, call_id: int) -> None:
        if self.failures:
            self.failures -= 1
            raise StorageUnavailable("mark reply sent: ConnectionResetError (injected)")
        await super().mark_sent(call_id)


async def test_a_send_telegram_confirmed_but_the_database_did_not_record_is_never_sent_again(
    api: BotApi, clock: FakeClock, fake: FakeTelegram, database_url: str
) -> None:
    storage = await ForgetfulStorage.connect(database_url)
    try:
        storage.failures = 3
        outbox = make_outbox(storage, api, clock)
        await outbox.send(await queue(storage, [GROUP], lease=30))
        await run_for(outbox, clock, 120, tick=1)  # long past its lease
        assert await unsent(database_url) == []  # recorded once the database took it
        assert len(fake.calls("sendMessage")) == 1
        # The same at shutdown: recorded before close() returns, so the next start has nothing to send.
        storage.failures = 2
        await outbox.send(await queue(storage, [OTHER_GROUP], update_id=2, lease=30))
        await outbox.close(1)
        assert await unsent(database_url) == []
        assert len(fake.calls("sendMessage")) == 2
    finally:
        await storage.close()


class SlowApi(BotApi):
    """Telegram taking 20 s (of the fake clock) to answer each call, during which another process's
    sweeper runs."""

    def __init__(self, api: BotApi, clock: FakeClock, other: Outbox) -> None:
        self.__dict__.update(api.__dict__)
        self._clock, self._other = clock, other

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (BotApi's signature)
    ) -> Any:
        self._clock.advance(20)
        await sweep(self._other)
        return await super().call(method, params, timeout=timeout)


async def test_an_update_s_later_calls_are_sent_once_when_its_earlier_ones_are_slow(
    storage: Storage,
    another_process: PostgresStorage,
    api: BotApi,
    clock: FakeClock,
    fake: FakeTelegram,
    database_url: str,
) -> None:
    # One update's three replies to its chat, leased together for 30 s when it committed and sent one
    # after another by the webhook's process (A), each answer taking 20 s, while another process's
    # sweeper (B) runs. The second's lease from the commit ran out while A was sending it: B took it and
    # sent it too. Now each lease runs from the moment its call is sent.
    other = make_outbox(another_process, api, clock)
    webhook = make_outbox(storage, SlowApi(api, clock, other), clock)
    await webhook.send(await queue(storage, [GROUP, GROUP, GROUP], lease=30))
    await run_for(other, clock, 60, tick=1)
    assert texts(fake.calls("sendMessage")) == ["#0", "#1", "#2"]
    assert await unsent(database_url) == []


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
    clock.advance(1)  # past the lease the database gave from its own clock
    delays = []
    for _ in range(6):
        await sweep(outbox)
        [row] = await unsent(database_url)
        delays.append(row["due"] - clock.now)
        clock.now = row["due"]
    await sweep(outbox)
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
        # Past the row's due time and its lease (both from the database's clock at enqueue), however long
        # the setup took on a loaded machine.
        clock.now = time.time() + 1
        await sweep(outbox)
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
    storage: Storage, another_process: PostgresStorage, api: BotApi, clock: FakeClock, fake: FakeTelegram
) -> None:
    outboxes = [make_outbox(storage, api, clock), make_outbox(another_process, api, clock)]
    for update_id in range(1, 21):
        calls = await queue(storage, [USER, GROUP], update_id=update_id, lease=30)
        await outboxes[update_id % 2].send(calls)
    for _ in range(700):
        await asyncio.gather(*(sweep(o) for o in outboxes))
        clock.advance(0.1)
    assert len(fake.delivered(USER)) == 20 and len(fake.delivered(GROUP)) == 20
    assert most_in_any_window(fake.delivered(USER), 1.0) == 1
    assert most_in_any_window(fake.delivered(GROUP), 60.0) == 20
    assert texts(fake.delivered(USER)) == ["#0"] * 20  # and each chat's calls in queue order:
    assert [c.params["chat_id"] for c in fake.delivered(GROUP)] == [GROUP] * 20
    assert len(fake.calls("sendMessage")) == 40
