"""The sender under a misbehaving Telegram: broken answers, slow answers, and errors it did not expect."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import asyncpg
import httpx
import pytest

from bot.app import SECRET_HEADER
from bot.apps.pizza_testing import PIZZA, hunger
from bot.metrics import Metrics
from bot.outbox import Outbox
from bot.runtime import start
from bot.storage import OutgoingCall, PendingCall
from bot.storage.memory import MemoryStorage
from bot.storage.postgres import PostgresStorage
from bot.telegram import BotApi
from bot.testing.env import SECRET, TOKEN, make_settings
from bot.testing.fake_telegram import MISBEHAVIOURS, FakeTelegram
from bot.testing.updates import encode, message_update

pytestmark = pytest.mark.anyio

OpenClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


async def post(client: httpx.AsyncClient, update: dict[str, object]) -> None:
    headers = {SECRET_HEADER: SECRET, "content-type": "application/json"}
    assert (await client.post("/webhook", content=encode(update), headers=headers)).status_code == 200


async def delivered_once_each(fake: FakeTelegram, expected: dict[int, str]) -> None:
    """Every chat got its reply, and (after a moment for a late copy to land) exactly once."""
    await fake.wait_for_async(lambda: len(fake.delivered_messages()) >= len(expected), timeout=30)
    await asyncio.sleep(1)
    got = sorted((m["chat"]["id"], m["text"]) for m in fake.delivered_messages())
    assert got == sorted(expected.items())


async def test_every_broken_answer_is_retried_and_every_reply_is_sent_exactly_once(
    open_client: OpenClient,
    database_url: str,
    telegram_root: str,
    fake: FakeTelegram,
    caplog: pytest.LogCaptureFixture,
) -> None:
    chats = {-300 - n: kind for n, kind in enumerate(MISBEHAVIOURS)}
    fake.misbehave_next("sendMessage", *chats.values())  # the first answer of each reply is broken
    fake.trickle_interval = 0.1  # the trickling one: cut short after BOT_API_TIMEOUT
    settings = make_settings(database_url, telegram_root, BOT_API_TIMEOUT="2")
    async with open_client(settings) as client:
        for n, chat_id in enumerate(chats):
            await post(client, message_update(2 * n + 1, chat_id, PIZZA))
            await post(client, hunger(2 * n + 2, chat_id))
        await delivered_once_each(fake, {chat_id: "Your hunger level is 1!" for chat_id in chats})
        # The replies after them go straight through: nothing is wedged.
        await post(client, hunger(100, -300))
        await fake.wait_for_async(lambda: len(fake.delivered_messages(-300)) == 2, timeout=10)
    assert len(fake.calls("sendMessage")) == 2 * len(chats) + 1  # one broken answer and one retry each
    assert "never retrieved" not in caplog.text
    assert not [r for r in caplog.records if r.name.startswith("bot") and r.levelno >= logging.ERROR]


class _FlakyStorage(MemoryStorage):
    """claim_due fails once with an error nobody planned for."""

    def __init__(self) -> None:
        super().__init__()
        self.claims = 0

    async def claim_due(self, limit: int, lease: float, now: float | None = None) -> list[PendingCall]:
        self.claims += 1
        if self.claims == 1:
            raise RuntimeError("a bug in the storage")
        return await super().claim_due(limit, lease, now)


async def test_the_sweeper_survives_any_error_logs_it_and_sends_on(
    telegram_root: str, fake: FakeTelegram, caplog: pytest.LogCaptureFixture
) -> None:
    storage = _FlakyStorage()
    async with storage.transaction() as tx:
        # Leased for no time: as if its sender had died, so only the sweeper sends it.
        await tx.enqueue(1, 1, [OutgoingCall("sendMessage", {"chat_id": 5, "text": "late"})], lease=0)
    async with httpx.AsyncClient(timeout=5) as http:
        outbox = Outbox(storage, BotApi(TOKEN, http, telegram_root), Metrics())
        sweeper = asyncio.create_task(outbox.run_sweeper(0.05))
        try:
            await fake.wait_for_async(lambda: len(fake.delivered_messages(5)) == 1, timeout=10)
        finally:
            sweeper.cancel()
    assert not sweeper.done() or sweeper.cancelled()  # cancelled by us, not dead of the error
    assert storage.claims >= 2
    assert "outbox sweeper: this round failed and was skipped" in caplog.text
    assert "a bug in the storage" in caplog.text


async def settled_reply(database_url: str) -> tuple[int, str | None]:
    """(attempts, last error) of the only outbox row, once it is marked sent."""
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(200):
            row = await conn.fetchrow("SELECT attempts, last_error, sent_at FROM outbox")
            if row is not None and row["sent_at"] is not None:
                return row["attempts"], row["last_error"]
            await asyncio.sleep(0.05)
        raise AssertionError(f"the reply was not marked sent: {row}")
    finally:
        await conn.close()


async def test_a_slow_bot_api_does_not_double_a_reply(
    open_client: OpenClient, database_url: str, telegram_root: str, fake: FakeTelegram
) -> None:
    # The case: Telegram answering after 10.5 s used to hit the 10 s read timeout, and the retry
    # doubled the reply. Telegram's own latency under load reaches tens of seconds.
    async with open_client(make_settings(database_url, telegram_root)) as client:
        fake.delay = 10.5
        await post(client, message_update(1, -310, PIZZA))
        await post(client, hunger(2, -310))
        await fake.wait_for_async(lambda: len(fake.delivered_messages(-310)) >= 1, timeout=30)
        fake.delay = 0
        # Marked sent on its first attempt: no timeout, so no retry was ever scheduled.
        assert await settled_reply(database_url) == (1, None)
    assert [m["text"] for m in fake.delivered_messages(-310)] == ["Your hunger level is 1!"]
    assert len(fake.calls("sendMessage")) == 1


async def test_a_retry_after_a_timeout_is_the_second_doubling_window_and_is_logged(
    open_client: OpenClient,
    database_url: str,
    telegram_root: str,
    fake: FakeTelegram,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(database_url, telegram_root, BOT_API_TIMEOUT="0.5", OUTBOX_LEASE="2")
    async with open_client(settings) as client:
        fake.delay = 1.5  # longer than the timeout: Telegram sends the message, its answer comes too late
        await post(client, message_update(1, -320, PIZZA))
        await post(client, hunger(2, -320))
        await fake.wait_for_async(lambda: len(fake.calls("sendMessage")) == 1, timeout=10)
        fake.delay = 0
        await fake.wait_for_async(lambda: len(fake.delivered_messages(-320)) >= 2, timeout=30)
    # Documented in docs/RELIABILITY.md: no idempotency key, so the retry doubles it, and the log says so.
    assert [m["text"] for m in fake.delivered_messages(-320)] == ["Your hunger level is 1!"] * 2
    assert "the first attempt may have reached Telegram" in caplog.text


async def test_a_trickling_answer_is_cut_at_the_deadline_and_its_retry_never_overlaps_it(
    open_client: OpenClient,
    database_url: str,
    telegram_root: str,
    fake: FakeTelegram,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The case: headers at once, then a byte a second. Each read was quick, so the call never
    # timed out; its lease ran out and the sweeper sent the same reply again, alongside it.
    settings = make_settings(
        database_url, telegram_root, BOT_API_TIMEOUT="1", OUTBOX_LEASE="3", OUTBOX_SWEEP_INTERVAL="0.1"
    )
    fake.trickle_interval = 0.2
    fake.misbehave_next("sendMessage", "trickle")
    async with open_client(settings) as client:
        await post(client, message_update(1, -330, PIZZA))
        await post(client, hunger(2, -330))
        await fake.wait_for_async(lambda: len(fake.delivered_messages(-330)) == 1, timeout=30)
        # Tried twice, one after the other: cut at the deadline (and logged as a possible double), then
        # sent; never two attempts at once.
        assert await settled_reply(database_url) == (2, None)
    assert fake.most_at_once("sendMessage") == 1
    assert "sendMessage failed: no answer within 1 s" in caplog.text
    assert "the first attempt may have reached Telegram" in caplog.text


async def test_shutdown_ends_every_send_before_the_pool_closes_and_the_next_start_doubles_nothing(
    database_url: str, telegram_root: str, fake: FakeTelegram
) -> None:
    # Replies the sweeper is sending when the process stops (a deploy), Telegram taking 1 s to answer.
    # They used to run on after the pool and the HTTP client closed: Telegram had them, the database
    # never heard, and the next start sent them again.
    settings = make_settings(
        database_url, telegram_root, OUTBOX_SWEEP_INTERVAL="0.1", OUTBOX_LEASE="2", BOT_API_TIMEOUT="1.5"
    )
    calls = [OutgoingCall("sendMessage", {"chat_id": -340 - n, "text": "late"}) for n in range(3)]
    await left_by_a_dead_process(database_url, 1, calls)
    fake.delay = 1.0
    async with start(settings):
        await fake.wait_for_async(lambda: fake.in_flight("sendMessage") == 3, timeout=10)
    # "Shutdown complete": every send ended and was recorded, and nothing is sent any more.
    assert await settled(database_url) == [1, 1, 1]
    await asyncio.sleep(1.5)
    assert len(fake.calls("sendMessage")) == 3
    fake.delay = 0
    # The next start, past the lease, has one reply of its own to send: its sweeper picks due replies in
    # the order they were made, so once that one is out, any of the three it would send again is too.
    await left_by_a_dead_process(
        database_url, 2, [OutgoingCall("sendMessage", {"chat_id": -343, "text": "new"})]
    )
    async with start(settings):
        await fake.wait_for_async(lambda: len(fake.delivered_messages(-343)) == 1, timeout=10)
        await asyncio.sleep(0.3)
    assert sorted(m["chat"]["id"] for m in fake.delivered_messages()) == [-343, -342, -341, -340]


async def left_by_a_dead_process(database_url: str, update_id: int, calls: list[OutgoingCall]) -> None:
    """Replies of update `update_id` enqueued with no lease, as a process that died left them: the
    sweeper's to send."""
    storage = await PostgresStorage.connect(database_url)
    try:
        async with storage.transaction() as tx:
            await tx.enqueue(update_id, 1, calls, lease=0)
    finally:
        await storage.close()


async def settled(database_url: str) -> list[int]:
    """Each outbox row's attempts once it is marked sent; -1 for a row that is not."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT attempts, sent_at IS NOT NULL AS sent FROM outbox ORDER BY id")
    finally:
        await conn.close()
    return [r["attempts"] if r["sent"] else -1 for r in rows]
