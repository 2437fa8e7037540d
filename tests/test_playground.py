"""The playground's API as the page uses it: real updates through /webhook, replies through the outbox."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest

from bot.app import SECRET_HEADER, create_app
from bot.apps.pizza_testing import PIZZA, hunger
from bot.config import load_settings
from bot.dispatch import Bot
from bot.playground.chats import BASE, PEOPLE, Ids, is_playground_id
from bot.storage import StorageUnavailable
from bot.storage.memory import MemoryStorage
from bot.testing.env import SECRET, USERNAME, make_settings
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.updates import encode

pytestmark = pytest.mark.anyio

OpenClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


class Page:
    """What the page does: call the API, and follow the event log."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.seen: list[dict[str, Any]] = []
        self._after = 0

    async def post(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.client.post(f"/playground/api/{name}", json=body)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def chat(self, kind: str = "group", **options: Any) -> dict[str, Any]:
        chat: dict[str, Any] = (await self.post("chats", {"type": kind, **options}))["chat"]
        return chat

    async def say(self, chat: dict[str, Any], text: str, **options: Any) -> int:
        answer = await self.post("send", {"chat": chat, "text": text, **options})
        assert answer["status"] == 200
        update_id: int = answer["update_id"]
        return update_id

    async def stored(self, chat: dict[str, Any]) -> Any:
        [row] = (await self.post("peek", {"chat": chat}))["rows"]
        return row["data"] if row["stored"] else None

    async def wait_for(self, wanted: Callable[[dict[str, Any]], bool], within: float = 10) -> dict[str, Any]:
        """The first event (seen before or arriving now) for which `wanted` holds."""
        deadline = time.monotonic() + within
        while True:
            for event in self.seen:
                if wanted(event):
                    return event
            if time.monotonic() > deadline:
                raise TimeoutError(f"no such event among {self.seen}")
            answer = (await self.client.get(f"/playground/api/events?after={self._after}&hold=1")).json()
            self.seen += answer["events"]
            if answer["events"]:
                self._after = answer["events"][-1]["seq"]

    async def reply_in(self, chat: dict[str, Any], text: str) -> dict[str, Any]:
        return await self.wait_for(
            lambda e: e["kind"] == "reply" and e["chat_id"] == chat["id"] and e["text"] == text
        )


@pytest.fixture
async def page(database_url: str, open_client: OpenClient) -> AsyncIterator[Page]:
    """The local trial: no token, so the playground is on and every Bot API call stays in the process."""
    async with open_client(load_settings({"DATABASE_URL": database_url})) as client:
        yield Page(client)


async def test_with_a_token_the_page_and_its_api_are_absent_saying_why_in_one_line(
    database_url: str, telegram_root: str, open_client: OpenClient
) -> None:
    async with open_client(make_settings(database_url, telegram_root)) as client:
        for path in ("/", "/playground/api/info", "/playground/static/app.js"):
            response = await client.get(path)
            assert response.status_code == 404, path
            assert response.text == "no playground here: BOT_TOKEN is set and PLAYGROUND is not 1\n"
        sent = await client.post("/playground/api/send", json={"chat": {"id": -BASE - 1, "type": "group"}})
        assert sent.status_code == 404


async def test_a_trial_with_the_playground_off_says_so(database_url: str, open_client: OpenClient) -> None:
    async with open_client(load_settings({"DATABASE_URL": database_url, "PLAYGROUND": "0"})) as client:
        response = await client.get("/")
        assert response.status_code == 404 and response.text == "no playground here: PLAYGROUND is off\n"


async def test_the_trial_serves_the_page_its_script_and_stylesheet(page: Page) -> None:
    html = await page.client.get("/")
    assert html.status_code == 200
    assert html.headers["content-type"].startswith("text/html")
    for asset in ('src="/playground/static/app.js"', 'href="/playground/static/style.css"'):
        assert asset in html.text
    for path, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = await page.client.get("/playground/static/" + path)
        assert response.status_code == 200 and kind in response.headers["content-type"]


async def test_the_quick_buttons_are_the_apps_examples(database_url: str, open_client: OpenClient) -> None:
    async with open_client(load_settings({"DATABASE_URL": database_url})) as client:
        assert (await client.get("/playground/api/info")).json()["quick"] == [
            PIZZA,
            "/hunger",
            "/hunger@local_trial_bot",
        ]
    other: Bot[None] = Bot()
    other.examples = ["hello", "/start@{username}"]
    async with open_client(load_settings({"DATABASE_URL": database_url}), bot=other) as client:
        assert (await client.get("/playground/api/info")).json()["quick"] == [
            "hello",
            "/start@local_trial_bot",
        ]


async def test_messages_go_through_the_webhook_and_replies_through_the_outbox(
    page: Page, database_url: str
) -> None:
    chat = await page.chat(title="Friday")
    sent = [await page.say(chat, f"{PIZZA} number {n}") for n in range(3)]
    question = await page.post("send", {"chat": chat, "text": "/hunger"})
    assert question["replies"] == 1  # what `python -m bot chat` waits for before it leaves
    sent.append(question["update_id"])
    await page.reply_in(chat, "Your hunger level is 3!")
    # The panel's feed: the stored row after each update, the last one after the /hunger.
    shown = [e["rows"][0] for e in page.seen if e["kind"] == "session" and e["chat_id"] == chat["id"]]
    assert [row["data"] for row in shown] == [{"pizza_count": n} for n in (1, 2, 3, 3)]
    assert shown[-1]["version"] == 0 and shown[-1]["updated_at"] == shown[-2]["updated_at"]
    conn = await asyncpg.connect(database_url)
    try:
        # The pipeline claimed each update, and the reply is an outbox row confirmed by the Bot API. The
        # page shows the reply when the API receives it; the outbox marks it sent once the answer is
        # back, a moment later: wait (bounded) for that mark.
        claimed = await conn.fetch("SELECT update_id FROM processed_updates ORDER BY update_id")
        for _ in range(100):
            outbox = await conn.fetch("SELECT method, payload, sent_at FROM outbox")
            if [row["sent_at"] is not None for row in outbox] == [True]:
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert [r["update_id"] for r in claimed] == sent
    [reply] = outbox
    assert reply["method"] == "sendMessage" and reply["sent_at"] is not None


async def test_deliver_again_is_recognised_and_changes_nothing(page: Page, database_url: str) -> None:
    chat = await page.chat()
    pizza = await page.say(chat, PIZZA)
    question = await page.say(chat, "/hunger")
    await page.reply_in(chat, "Your hunger level is 1!")
    for update_id in (pizza, question, pizza):
        assert (await page.post("redeliver", {"update_id": update_id}))["status"] == 200
    assert await page.stored(chat) == {"pizza_count": 1}
    conn = await asyncpg.connect(database_url)
    try:
        # The redelivered /hunger queued no second answer.
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 1
    finally:
        await conn.close()


async def test_twenty_at_once_are_all_counted(page: Page) -> None:
    chat = await page.chat()
    burst = await page.post("burst", {"chat": chat, "text": PIZZA, "count": 20})
    assert burst["statuses"] == [200] * 20
    assert len(set(burst["update_ids"])) == 20
    assert await page.stored(chat) == {"pizza_count": 20}


async def test_upgrading_a_group_moves_its_count_to_the_supergroup(page: Page) -> None:
    group = await page.chat(title="Old group")
    await page.say(group, PIZZA)
    await page.say(group, PIZZA)
    upgraded = await page.post("upgrade", {"chat": group})
    supergroup = upgraded["chat"]
    assert upgraded["statuses"] == [200, 200]
    assert supergroup["type"] == "supergroup" and supergroup["id"] != group["id"]
    assert await page.stored(group) is None
    await page.say(supergroup, "/hunger")
    await page.reply_in(supergroup, "Your hunger level is 2!")
    await page.wait_for(
        lambda e: e["kind"] == "update" and e["service"] == {"migrate_to_chat_id": supergroup["id"]}
    )


async def test_a_reply_in_a_forum_topic_stays_in_that_topic(page: Page) -> None:
    forum = await page.chat("supergroup", forum=True)
    assert forum["is_forum"] is True
    await page.say(forum, "/hunger", thread_id=2)
    reply = await page.reply_in(forum, "Your hunger level is 0!")
    assert reply["thread_id"] == 2


async def test_in_a_private_chat_its_user_is_the_one_writing(page: Page) -> None:
    ann, bob = PEOPLE[:2]
    chat = await page.chat("private", sender=bob.id)
    assert (chat["id"], chat["title"]) == (bob.id, "Bob")
    await page.say(chat, PIZZA, sender=ann.id)  # Ann picked in the page: still Bob's message
    sent = await page.wait_for(lambda e: e["kind"] == "update" and e["chat_id"] == chat["id"])
    assert sent["sender"] == "Bob"


@pytest.mark.parametrize("kind", ["private", "channel"])
async def test_private_chats_and_channels_count_too(page: Page, kind: str) -> None:
    chat = await page.chat(kind)
    await page.say(chat, PIZZA)
    await page.say(chat, "/hunger@local_trial_bot")
    await page.reply_in(chat, "Your hunger level is 1!")


async def test_real_chat_ids_and_cross_site_posts_are_refused(page: Page, database_url: str) -> None:
    real = {"chat": {"id": -100123, "type": "group", "title": "someone's group"}, "text": PIZZA}
    refused = await page.client.post("/playground/api/send", json=real)
    assert refused.status_code == 400 and "not a playground chat" in refused.text
    chat = await page.chat()
    # A form or a text/plain fetch from another site reaches a local server without a CORS check.
    plain = await page.client.post(
        "/playground/api/send",
        content=encode({"chat": chat, "text": PIZZA}),
        headers={"content-type": "text/plain"},
    )
    assert plain.status_code == 415
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM processed_updates") == 0
    finally:
        await conn.close()


async def test_with_a_token_and_playground_on_only_playground_chats_are_answered_locally(
    database_url: str, telegram_root: str, fake: FakeTelegram, open_client: OpenClient
) -> None:
    settings = make_settings(database_url, telegram_root, PLAYGROUND="1")
    async with open_client(settings) as client:
        page = Page(client)
        chat = await page.chat()
        await page.say(chat, f"/hunger@{USERNAME}")
        await page.reply_in(chat, "Your hunger level is 0!")
        headers = {SECRET_HEADER: SECRET, "content-type": "application/json"}
        assert (
            await client.post("/webhook", content=encode(hunger(7, -100)), headers=headers)
        ).status_code == 200
        await fake.wait_for_async(lambda: len(fake.sent_messages()) == 1)
    assert [m["chat_id"] for m in fake.sent_messages()] == [-100]


@asynccontextmanager
async def trial_on(storage: MemoryStorage) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(load_settings({}), storage=storage)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bot") as client,
    ):
        yield client


async def test_without_a_readable_storage_the_session_panel_is_empty() -> None:
    async with trial_on(MemoryStorage()) as client:
        page = Page(client)
        chat = await page.chat()
        await page.say(chat, PIZZA)
        assert (await page.post("peek", {"chat": chat}))["rows"] == []


async def test_update_ids_continue_above_those_recorded_even_if_the_clock_went_back(
    database_url: str, open_client: OpenClient
) -> None:
    # A run whose clock was a day ahead (or whose ids ran ahead of it) left this id behind.
    ahead = Ids().next() + 86_400 * 10**6
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO processed_updates (bot_id, update_id) VALUES (0, $1)", ahead)
    finally:
        await conn.close()
    async with open_client(load_settings({"DATABASE_URL": database_url})) as client:
        page = Page(client)
        chat = await page.chat()
        assert await page.say(chat, PIZZA) > ahead
        assert await page.stored(chat) == {"pizza_count": 1}  # counted, not taken for a redelivery


async def test_a_database_that_does_not_answer_is_a_503() -> None:
    class Down(MemoryStorage):
        async def latest_update_id(self, bot_id: int) -> int | None:
            raise StorageUnavailable("connection refused")

    async with trial_on(Down()) as client:
        response = await client.post("/playground/api/chats", json={"type": "group"})
    assert response.status_code == 503
    assert response.json() == {"error": "the database is not answering: connection refused"}


def test_playground_ids_rise_and_stay_out_of_telegrams_range() -> None:
    ids = Ids()
    made = [ids.next() for _ in range(1000)]
    assert made == sorted(set(made))
    assert all(is_playground_id(i) and is_playground_id(-i) for i in made)
    assert not is_playground_id(2**52 - 1) and not is_playground_id(-1001234567890)
    assert max(made) < 2**53  # exact as a JavaScript number


async def test_a_poll_after_a_restart_starts_over(page: Page) -> None:
    await page.chat()
    answer = (await page.client.get("/playground/api/events?after=999&epoch=old&hold=0")).json()
    assert answer["events"][0]["kind"] == "chat"
    assert answer["epoch"] != "old"
