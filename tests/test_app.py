"""The webhook as Telegram sees it: through HTTP (in process, via ASGITransport), on real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from bot.app import SECRET_HEADER
from bot.apps.pizza import PizzaSession, build_bot
from bot.apps.pizza_testing import PIZZA, hunger
from bot.config import Settings
from bot.context import Context
from bot.filters import text
from bot.testing.env import SECRET, USERNAME, make_settings
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.updates import encode, message_update

pytestmark = pytest.mark.anyio

OpenClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def settings(database_url: str, telegram_root: str) -> Settings:
    return make_settings(database_url, telegram_root)


@pytest.fixture
async def client(settings: Settings, open_client: OpenClient) -> AsyncIterator[httpx.AsyncClient]:
    async with open_client(settings) as c:
        yield c


async def post(client: httpx.AsyncClient, update: dict[str, Any] | bytes, secret: str | None = SECRET) -> int:
    headers = {"content-type": "application/json"}
    if secret is not None:
        headers[SECRET_HEADER] = secret
    body = update if isinstance(update, bytes) else encode(update)
    return (await client.post("/webhook", content=body, headers=headers)).status_code


async def replies(fake: FakeTelegram, chat_id: int, count: int) -> list[str]:
    """The texts sent to a chat, once `count` of them arrived (replies go out after the 200)."""
    await fake.wait_for_async(lambda: len(fake.sent_messages(chat_id)) >= count, timeout=10)
    return [m["text"] for m in fake.sent_messages(chat_id)]


async def table_counts(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        return {
            table: await conn.fetchval(f"SELECT count(*) FROM {table}")
            for table in ("sessions", "processed_updates", "outbox")
        }
    finally:
        await conn.close()


async def test_pizza_then_hunger_replies_with_the_count(
    client: httpx.AsyncClient, fake: FakeTelegram
) -> None:
    assert await post(client, message_update(1, -100, f"two {PIZZA}{PIZZA} in one message")) == 200
    assert await post(client, message_update(2, -100, "no pizza here")) == 200
    assert await post(client, hunger(3, -100)) == 200
    assert await replies(fake, -100, 1) == ["Your hunger level is 1!"]


async def test_hunger_in_a_new_chat_is_zero(client: httpx.AsyncClient, fake: FakeTelegram) -> None:
    assert await post(client, hunger(1, 555)) == 200
    assert await replies(fake, 555, 1) == ["Your hunger level is 0!"]


async def test_each_chat_has_its_own_count(client: httpx.AsyncClient, fake: FakeTelegram) -> None:
    await post(client, message_update(1, -1, PIZZA))
    await post(client, message_update(2, -2, PIZZA))
    await post(client, message_update(3, -2, PIZZA))
    await post(client, hunger(4, -1))
    await post(client, hunger(5, -2))
    assert await replies(fake, -1, 1) == ["Your hunger level is 1!"]
    assert await replies(fake, -2, 1) == ["Your hunger level is 2!"]


# Forwarded from an origin of a type newer than our Bot API: still a text message.
FORWARDED_FROM_A_NEWER_ORIGIN = message_update(1, -5, PIZZA).json()
FORWARDED_FROM_A_NEWER_ORIGIN["message"]["forward_origin"] = {"type": "a_future_origin", "date": 0}


@pytest.mark.parametrize(
    ("update", "counts"),
    [
        (message_update(1, -5, PIZZA, kind="channel_post"), True),
        (message_update(1, -5, None, caption=PIZZA), False),
        (message_update(1, -5, PIZZA, kind="edited_message"), False),
        (message_update(1, -5, f"/hunger {PIZZA}"), False),  # the command, not also a pizza
        (message_update(1, -5, f"/hunger@other_bot {PIZZA}"), True),  # not our command: just text
        (message_update(1, -5, f"/start {PIZZA}"), True),
        (FORWARDED_FROM_A_NEWER_ORIGIN, True),
    ],
)
async def test_what_counts_as_a_pizza(
    client: httpx.AsyncClient, fake: FakeTelegram, update: dict[str, Any], counts: bool
) -> None:
    assert await post(client, update) == 200
    await post(client, hunger(2, -5))
    texts = await replies(fake, -5, 1)
    assert texts[-1] == f"Your hunger level is {int(counts)}!"


async def test_hunger_addressed_to_us_is_answered_and_to_another_bot_is_not(
    client: httpx.AsyncClient, fake: FakeTelegram
) -> None:
    await post(client, hunger(1, -7, username="other_bot"))
    await post(client, hunger(2, -7, username=USERNAME))
    await post(client, message_update(3, -7, f"/hunger@{USERNAME.upper()} please"))
    assert await replies(fake, -7, 2) == ["Your hunger level is 0!"] * 2
    await asyncio.sleep(0.2)
    assert len(fake.sent_messages(-7)) == 2


async def test_reply_goes_to_the_same_forum_topic(client: httpx.AsyncClient, fake: FakeTelegram) -> None:
    await post(client, hunger(1, -9, thread_id=77))
    await replies(fake, -9, 1)
    assert fake.sent_messages(-9)[0]["message_thread_id"] == 77


async def test_a_reply_thread_outside_a_forum_is_not_a_topic_to_reply_in(
    client: httpx.AsyncClient, fake: FakeTelegram
) -> None:
    # A reply in a supergroup without topics carries its reply thread's message_thread_id, but no
    # is_topic_message; sendMessage's message_thread_id is for forum topics only (the Bot API).
    reply = {
        "message_thread_id": 40,
        "reply_to_message": {"message_id": 40, "date": 0, "chat": {"id": -10, "type": "supergroup"}},
    }
    await post(client, hunger(1, -10, extra=reply))
    await replies(fake, -10, 1)
    assert "message_thread_id" not in fake.sent_messages(-10)[0]


@pytest.mark.parametrize("mode", ["optimistic", "locked"])
async def test_the_reply_goes_out_after_the_commit_with_no_row_lock_held(
    open_client: OpenClient, database_url: str, telegram_root: str, fake: FakeTelegram, mode: str
) -> None:
    fake.delay = 2.0  # the fake holds the reply's call open while the chat's row is looked at
    conn = await asyncpg.connect(database_url)
    try:
        async with open_client(make_settings(database_url, telegram_root, DB_CONCURRENCY=mode)) as client:
            assert await post(client, message_update(1, -17, PIZZA)) == 200
            answered = asyncio.create_task(post(client, hunger(2, -17)))
            await fake.wait_for_async(lambda: len(fake.calls("sendMessage")) == 1)
            async with conn.transaction():  # NOWAIT: LockNotAvailable, were the row still locked
                assert await conn.fetchval("SELECT 1 FROM sessions WHERE key = '-17' FOR UPDATE NOWAIT") == 1
            assert await conn.fetchval("SELECT count(*) FROM processed_updates WHERE update_id = 2") == 1
            assert fake.delivered_messages(-17) == []  # still in flight when the row was looked at
            assert await answered == 200
    finally:
        await conn.close()


async def test_concurrent_pizzas_for_one_chat_are_all_counted(
    client: httpx.AsyncClient, fake: FakeTelegram, database_url: str
) -> None:
    statuses = await asyncio.gather(*(post(client, message_update(i, -3, PIZZA)) for i in range(1, 201)))
    assert statuses == [200] * 200
    await post(client, hunger(1000, -3))
    assert await replies(fake, -3, 1) == ["Your hunger level is 200!"]


async def test_redelivered_updates_are_applied_and_answered_once(
    client: httpx.AsyncClient, fake: FakeTelegram
) -> None:
    pizzas = [message_update(i, -4, PIZZA) for i in range(1, 51)]
    statuses = await asyncio.gather(*(post(client, u) for u in pizzas + pizzas))
    assert statuses == [200] * 100
    await asyncio.gather(*(post(client, hunger(100, -4)) for _ in range(5)))
    assert await replies(fake, -4, 1) == ["Your hunger level is 50!"]
    await asyncio.sleep(0.3)
    assert len(fake.sent_messages(-4)) == 1


@pytest.mark.parametrize("secret", [None, "", "wrong", SECRET + "x", SECRET.upper()])
async def test_wrong_or_missing_secret_is_401_and_touches_nothing(
    client: httpx.AsyncClient, database_url: str, secret: str | None
) -> None:
    assert await post(client, message_update(1, -6, PIZZA), secret=secret) == 401
    assert await post(client, hunger(2, -6), secret=secret) == 401
    assert await table_counts(database_url) == {"sessions": 0, "processed_updates": 0, "outbox": 0}


async def test_a_wrong_secret_is_401_before_a_byte_of_the_body_is_read(client: httpx.AsyncClient) -> None:
    # "Nothing read": a body that never finishes arriving, which the 401 must not wait for.
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        pulled += 1
        yield b'{"update_id": 1, "message": '
        await asyncio.Event().wait()

    request = client.post("/webhook", content=endless(), headers={SECRET_HEADER: "wrong"})
    assert (await asyncio.wait_for(request, 10)).status_code == 401
    assert pulled == 0


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b"{}",
        b'{"update_id": "1"}',
        b'{"update_id": 1, "message": {"chat": {"id": 1}}}',
        b'{"update_id": 1, "message": {"message_id": 1, "chat": {"id": 1e400, "type": "group"}}}',
        b'{"update_id": 123456789012345678901234567890}',
    ],
)
async def test_malformed_bodies_are_400_and_touch_nothing(
    client: httpx.AsyncClient, database_url: str, body: bytes
) -> None:
    assert await post(client, body) == 400
    assert await table_counts(database_url) == {"sessions": 0, "processed_updates": 0, "outbox": 0}


async def test_oversize_body_is_413_with_or_without_content_length(client: httpx.AsyncClient) -> None:
    big = encode(message_update(1, -8, PIZZA + "x" * (1024 * 1024)))
    assert await post(client, big) == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 32768  # 1.25 MiB, streamed without a declared length

    response = await client.post("/webhook", content=chunks(), headers={SECRET_HEADER: SECRET})
    assert response.status_code == 413


@pytest.mark.parametrize(("past", "status"), [(0, 200), (1, 413)], ids=["the-limit", "one-byte-past-it"])
async def test_a_body_streamed_without_a_length_is_applied_up_to_the_limit(
    client: httpx.AsyncClient, fake: FakeTelegram, settings: Settings, past: int, status: int
) -> None:
    # Chunked, as a proxy may forward it: no Content-Length to refuse early, counted as it arrives.
    size = settings.max_body_bytes + past
    filler = "x" * (size - len(encode(message_update(1, -16, PIZZA))))
    body = encode(message_update(1, -16, PIZZA + filler))
    assert len(body) == size

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, size, 65537):  # pieces that do not divide the limit
            yield body[start : start + 65537]

    response = await client.post("/webhook", content=pieces(), headers={SECRET_HEADER: SECRET})
    assert response.status_code == status
    assert await post(client, hunger(2, -16)) == 200
    assert await replies(fake, -16, 1) == [f"Your hunger level is {int(status == 200)}!"]


@pytest.mark.parametrize(
    "update",
    [
        {
            "update_id": 1,
            "callback_query": {
                "id": "1",
                "from": {"id": 1, "is_bot": False, "first_name": "A"},
                "chat_instance": "1",
            },
        },
        {
            "update_id": 1,
            "poll": {
                "id": "1",
                "question": "?",
                "options": [],
                "total_voter_count": 0,
                "is_closed": False,
                "is_anonymous": True,
                "type": "regular",
                "allows_multiple_answers": False,
                "allows_revoting": False,
                "members_only": False,
            },
        },
        {  # the pizza bot has no handler for it (the bot was added to a group)
            "update_id": 1,
            "my_chat_member": {
                "chat": {"id": -1, "type": "group"},
                "from": {"id": 1, "is_bot": False, "first_name": "A"},
                "date": 0,
                "old_chat_member": {"status": "left", "user": {"id": 9, "is_bot": True, "first_name": "B"}},
                "new_chat_member": {"status": "member", "user": {"id": 9, "is_bot": True, "first_name": "B"}},
            },
        },
        {"update_id": 1, "something_new": {"from": "the future"}},
        message_update(1, -2, "just chatting"),
    ],
)
async def test_updates_the_bot_does_not_handle_are_200_without_database_work(
    client: httpx.AsyncClient, database_url: str, update: dict[str, Any]
) -> None:
    assert await post(client, update) == 200
    assert await table_counts(database_url) == {"sessions": 0, "processed_updates": 0, "outbox": 0}


async def test_a_handler_bug_is_rolled_back_recorded_as_a_dead_letter_and_acknowledged(
    open_client: OpenClient, settings: Settings, fake: FakeTelegram, caplog: pytest.LogCaptureFixture
) -> None:
    bot = build_bot()

    @bot.message(text(equals="boom"))
    async def boom(ctx: Context[PizzaSession]) -> None:
        ctx.session.pizza_count += 1000
        raise ZeroDivisionError("bug")

    async with open_client(settings, bot) as client:
        assert await post(client, message_update(1, -11, PIZZA)) == 200
        assert await post(client, message_update(2, -11, "boom")) == 200
        assert await post(client, hunger(3, -11)) == 200
        assert await replies(fake, -11, 1) == ["Your hunger level is 1!"]
        assert "update 2 is a dead letter (attempt 1): ZeroDivisionError: bug" in caplog.text
    assert any(
        getattr(r, "update_id", None) == 2 and getattr(r, "outcome", None) == "dead_letter"
        for r in caplog.records
    )
    conn = await asyncpg.connect(settings.database_url)
    try:
        row = await conn.fetchrow("SELECT chat, kind, error, attempts FROM dead_letters WHERE update_id = 2")
    finally:
        await conn.close()
    assert row is not None and dict(row) == {
        "chat": "-11",
        "kind": "message",
        "error": "ZeroDivisionError: bug",
        "attempts": 1,
    }


@pytest.mark.parametrize(
    ("mode", "pooled"),
    [
        pytest.param("optimistic", False, id="optimistic"),
        pytest.param("locked", False, id="locked"),
        pytest.param("optimistic", True, id="optimistic-pgbouncer"),
    ],
)
async def test_a_locked_row_past_lock_timeout_is_503_and_nothing_is_half_written(
    open_client: OpenClient,
    database_url: str,
    telegram_root: str,
    fake: FakeTelegram,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
    mode: str,
    pooled: bool,
) -> None:
    # Both ways of applying an update give up on a row held by someone else after DB_LOCK_TIMEOUT, long
    # before the request's deadline: the optimistic statement, sent outside a transaction block, waited
    # for the row until the deadline (25 s by default) before it set the lock timeout itself. `pooled`:
    # the bot behind PgBouncer in transaction mode, which keeps no setting of a connection's.
    url = request.getfixturevalue("pooled_database_url") if pooled else database_url
    settings = make_settings(
        url, telegram_root, DB_CONCURRENCY=mode, DB_LOCK_TIMEOUT="1", REQUEST_DEADLINE="55"
    )
    async with open_client(settings) as client:
        assert await post(client, message_update(1, -12, PIZZA)) == 200
        blocker = await asyncpg.connect(database_url)
        try:
            async with blocker.transaction():
                await blocker.execute("SELECT 1 FROM sessions WHERE key = '-12' FOR UPDATE")
                # A bound, not a timing: answered well within a deadline 20 times the lock timeout.
                assert await asyncio.wait_for(post(client, message_update(2, -12, PIZZA)), 20) == 503
        finally:
            await blocker.close()
        assert "LockNotAvailable" in caplog.text  # the lock timeout ended it, not the deadline
        counts = await table_counts(database_url)
        assert counts["processed_updates"] == 1  # update 2 was not recorded: its redelivery will apply it
        assert await post(client, message_update(2, -12, PIZZA)) == 200
        assert await post(client, hunger(3, -12)) == 200
        assert await replies(fake, -12, 1) == ["Your hunger level is 2!"]


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.get("/webhook")).status_code == 405


async def test_readiness_is_503_on_an_unmigrated_database(
    open_client: OpenClient, empty_database_url: str, telegram_root: str
) -> None:
    async with open_client(make_settings(empty_database_url, telegram_root)) as client:
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert "not ready" in json.loads(response.text)["error"]


async def test_readiness_hides_driver_details(
    client: httpx.AsyncClient, database_url: str, pg_cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The probe needs no secret: a driver's error names databases, users and addresses.
    admin = await asyncpg.connect(pg_cluster.dsn("postgres"))
    try:
        await admin.execute(f"DROP DATABASE {urlsplit(database_url).path.lstrip('/')} WITH (FORCE)")
    finally:
        await admin.close()
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"ok": False, "error": "database not ready"}
    assert "does not exist" in caplog.text  # the details are in the log


async def test_webhook_reply_mode_answers_in_the_response_body_once(
    open_client: OpenClient, database_url: str, telegram_root: str, fake: FakeTelegram
) -> None:
    settings = make_settings(database_url, telegram_root, WEBHOOK_REPLY="true")
    async with open_client(settings) as client:
        await post(client, message_update(1, -13, PIZZA))
        headers = {SECRET_HEADER: SECRET, "content-type": "application/json"}
        response = await client.post("/webhook", content=encode(hunger(2, -13)), headers=headers)
        assert response.status_code == 200
        assert response.json() == {"method": "sendMessage", "chat_id": -13, "text": "Your hunger level is 1!"}
        again = await client.post("/webhook", content=encode(hunger(2, -13)), headers=headers)
        assert again.status_code == 200
        assert again.content == b""  # a redelivery: already answered, nothing to send
        await asyncio.sleep(0.3)
        assert fake.sent_messages(-13) == []  # nothing went through the Bot API as well


async def test_an_exhausted_pool_is_503_and_nothing_is_half_written(
    open_client: OpenClient, database_url: str, telegram_root: str, fake: FakeTelegram
) -> None:
    settings = make_settings(
        database_url,
        telegram_root,
        DB_POOL_MIN="1",
        DB_POOL_MAX="1",
        DB_ACQUIRE_TIMEOUT="0.3",
        DB_LOCK_TIMEOUT="10",
    )
    async with open_client(settings) as client:
        assert await post(client, message_update(1, -14, PIZZA)) == 200
        blocker = await asyncpg.connect(database_url)
        try:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("SELECT 1 FROM sessions WHERE key = '-14' FOR UPDATE")
            # This one takes the pool's only connection and waits for the row lock...
            waiting = asyncio.create_task(post(client, message_update(2, -14, PIZZA)))
            await asyncio.sleep(0.3)
            # ...so this one, for another chat, finds no connection in time.
            assert await post(client, message_update(3, -15, PIZZA)) == 503
            await tx.rollback()
            assert await waiting == 200
        finally:
            await blocker.close()
        assert await post(client, message_update(3, -15, PIZZA)) == 200  # the redelivery
        assert await post(client, hunger(4, -14)) == 200
        assert await post(client, hunger(5, -15)) == 200
        assert await replies(fake, -14, 1) == ["Your hunger level is 2!"]
        assert await replies(fake, -15, 1) == ["Your hunger level is 1!"]
