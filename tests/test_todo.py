"""The second app, examples/todo.py, through the webhook as Telegram drives it, on both storages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import httpx
import pytest

from bot.storage import Storage
from bot.testing.chat import Chat
from bot.testing.env import UNPACED_ENV, make_settings
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.updates import callback_update, member_update, reaction_update
from examples.todo import build_bot

pytestmark = pytest.mark.anyio

OpenClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
GROUP, ANN, BOB = -100, 11, 22


@pytest.fixture
async def client(
    storage: Storage, database_url: str, telegram_root: str, open_client: OpenClient
) -> AsyncIterator[httpx.AsyncClient]:
    async with open_client(
        make_settings(database_url, telegram_root, **UNPACED_ENV), build_bot(), storage
    ) as c:
        yield c


@pytest.fixture
def chat(client: httpx.AsyncClient, fake: FakeTelegram) -> Chat:
    return Chat(client, fake, chat=GROUP, sender=ANN)


async def test_a_group_keeps_a_list_and_buttons_tick_tasks_off(chat: Chat, fake: FakeTelegram) -> None:
    await chat.send(member_update(chat.id(), GROUP, ANN, "left", "member"))
    await fake.wait_for_async(lambda: bool(fake.sent_messages(GROUP)))
    assert fake.sent_messages(GROUP)[0]["text"].startswith("Hi! I keep this group's to-do list")

    assert await chat.say("/add buy milk") == "▫️ 1. buy milk"
    reply = await chat.say("/add fix the bike", sender=BOB)
    assert reply == "▫️ 1. buy milk\n▫️ 2. fix the bike"
    keyboard = fake.sent_messages(GROUP)[-1]["reply_markup"]["inline_keyboard"]
    assert keyboard == [
        [{"text": "✅ 1", "callback_data": "done:1"}, {"text": "✅ 2", "callback_data": "done:2"}]
    ]

    press = callback_update(chat.id(), GROUP, BOB, "done:1", message_id=55)
    await chat.send(press)
    [answer] = await chat.call_params("answerCallbackQuery", 1)
    assert answer == {"callback_query_id": press.json()["callback_query"]["id"], "text": "Done: buy milk"}
    [edit] = await chat.call_params("editMessageText", 1)
    assert (edit["chat_id"], edit["message_id"]) == (GROUP, 55)
    assert edit["text"] == "✅ 1. buy milk\n▫️ 2. fix the bike"
    assert edit["reply_markup"] == {"inline_keyboard": [[{"text": "✅ 2", "callback_data": "done:2"}]]}

    # Telegram redelivers the press: nothing is ticked or answered twice.
    await chat.send(press)
    await chat.send(callback_update(chat.id(), GROUP, ANN, "done:1", message_id=55))
    answers = await chat.call_params("answerCallbackQuery", 2)
    assert answers[1]["text"] == "That one is done already."
    await asyncio.sleep(0.1)
    assert len(fake.calls("answerCallbackQuery")) == 2
    assert len(fake.calls("editMessageText")) == 1
    assert await chat.say("/list") == "✅ 1. buy milk\n▫️ 2. fix the bike"


async def test_each_person_has_stats_across_chats(chat: Chat, fake: FakeTelegram) -> None:
    await chat.say("/add one")
    await chat.say("/add two", chat=ANN)  # Ann's private chat with the bot
    await chat.send(callback_update(chat.id(), GROUP, BOB, "done:1"))
    await chat.call_params("answerCallbackQuery", 1)
    await chat.send(reaction_update(chat.id(), GROUP, ANN, 1, "👍"))
    await chat.send(reaction_update(chat.id(), GROUP, BOB, 1, "🔥"))
    assert await chat.say("/me") == "You added 2, finished 0, and cheered 1 times."
    assert await chat.say("/me", sender=BOB) == "You added 0, finished 1, and cheered 0 times."
    assert await chat.say("/list", chat=ANN) == "▫️ 1. two"  # the private chat has its own list


async def test_mistakes_are_answered_by_the_error_hook_and_change_nothing(chat: Chat) -> None:
    await chat.say("/add one")
    assert await chat.say("/add") == "What should I add? Write it after the command: /add buy milk"
    assert await chat.say("/list") == "▫️ 1. one"
    assert await chat.say("/me") == "You added 1, finished 0, and cheered 0 times."


async def test_only_admins_clear_the_list(chat: Chat, fake: FakeTelegram) -> None:
    await chat.say("/add one")
    assert await chat.say("/clear", sender=BOB) == "Only the group's admins can do that."
    assert await chat.say("/list") == "▫️ 1. one"
    fake.admins[GROUP] = {BOB}
    assert await chat.say("/clear", sender=BOB) == "The list is cleared."
    assert await chat.say("/list") == "The list is empty. /add something!"
    assert [c.params["user_id"] for c in fake.calls("getChatMember")] == [BOB, BOB]


async def test_removing_the_bot_deletes_the_groups_list(chat: Chat, storage: Storage) -> None:
    await chat.say("/add one")
    await chat.send(member_update(chat.id(), GROUP, ANN, "member", "kicked"))
    async with storage.transaction() as tx:
        assert await tx.read(f"todo:{GROUP}") is None
        assert await tx.read(f"todo-user:{ANN}") is not None


def test_the_todo_bot_asks_telegram_for_what_its_handlers_receive() -> None:
    assert build_bot().allowed_updates() == [
        "message",
        "channel_post",
        "message_reaction",
        "callback_query",
        "my_chat_member",
    ]
