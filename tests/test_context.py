"""What handlers call on the context: queued calls (awaitable or not), replies, buttons, ctx.api."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from bot.context import BotIdentity, Context, ImmediateApi, QueuedCall
from bot.keyboards import button, inline_keyboard
from bot.storage import OutgoingCall
from bot.telegram import BotApi, BotApiError, decode_update
from bot.testing.env import TOKEN
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.updates import callback_update, encode, member_update, message_update, reaction_update
from bot.types import (
    BotCommand,
    BotCommandScopeChat,
    ChatMemberAdministrator,
    ChatMemberMember,
    InputFile,
    Message,
    Update,
    User,
)

pytestmark = pytest.mark.anyio


def ctx(raw: Update | dict[str, Any], api: ImmediateApi | None = None) -> Context[Any]:
    update = decode_update(encode(raw))
    return (
        Context(update, BotIdentity(1, "todo_bot"))
        if api is None
        else Context(update, BotIdentity(1, "x"), api)
    )


async def test_reply_works_with_and_without_await_and_says_it_is_not_sent_yet() -> None:
    c = ctx(message_update(1, -5, "hi"))
    plain = c.reply("one")
    awaited = await c.reply("two")
    assert isinstance(plain, QueuedCall)
    assert awaited.params == {"chat_id": -5, "text": "two"}
    assert "sent after commit" in repr(awaited)
    assert [call.params["text"] for call in c.calls] == ["one", "two"]  # queued once each


async def test_a_button_press_replies_in_the_chat_of_its_message_and_its_topic() -> None:
    raw = callback_update(1, -5, 7, "x", message_id=9).json()
    raw["callback_query"]["message"].update(message_thread_id=3, is_topic_message=True)
    c = ctx(raw)
    assert c.reply("hi").params == {"chat_id": -5, "text": "hi", "message_thread_id": 3}
    assert c.answer("ok", show_alert=True).params == {
        "callback_query_id": raw["callback_query"]["id"],
        "text": "ok",
        "show_alert": True,
    }
    assert c.edit_text("new").params == {"chat_id": -5, "message_id": 9, "text": "new"}


async def test_an_inline_mode_button_edits_by_inline_message_id_and_has_no_chat() -> None:
    raw = callback_update(1, -5, 7, "x").json()
    del raw["callback_query"]["message"]
    raw["callback_query"]["inline_message_id"] = "AbC"
    c = ctx(raw)
    assert c.edit_text("new").params == {"inline_message_id": "AbC", "text": "new"}
    with pytest.raises(ValueError, match="callback_query has no chat"):
        c.reply("hi")


async def test_button_methods_outside_a_button_press_say_so() -> None:
    c = ctx(message_update(1, -5, "hi"))
    with pytest.raises(ValueError, match="answer\\(\\): this message is not a button press"):
        c.answer()
    with pytest.raises(ValueError, match="edit_text\\(\\): this message is not a button press"):
        c.edit_text("x")


@pytest.mark.parametrize(
    ("raw", "chat", "user"),
    [
        (message_update(1, -5, "hi", from_id=7), -5, 7),
        (message_update(1, -5, "hi", kind="edited_message", from_id=7), -5, 7),
        (message_update(1, -5, "hi", kind="channel_post"), -5, None),
        (callback_update(1, -5, 7, "x"), -5, 7),
        (member_update(1, -5, 7, "left", "member"), -5, 7),
        (reaction_update(1, -5, 7, 3, "👍"), -5, 7),
    ],
)
async def test_every_update_kind_has_its_chat_and_sender(
    raw: dict[str, Any], chat: int, user: int | None
) -> None:
    c = ctx(raw)
    assert c.chat is not None and c.chat.id == chat
    assert (c.from_user.id if c.from_user is not None else None) == user


async def test_ctx_api_calls_now_and_is_bounded_by_its_timeout(
    fake: FakeTelegram, telegram_root: str
) -> None:
    async with httpx.AsyncClient() as http:
        api = ImmediateApi(BotApi(TOKEN, http, telegram_root), timeout=0.2)
        c = ctx(message_update(1, -5, "hi"), api)
        fake.admins[-5] = {7}
        member = await c.api.call("getChatMember", chat_id=-5, user_id=7)  # untyped: JSON values
        assert member["status"] == "administrator"
        fake.fail_next("getChat", error_code=400, description="Bad Request: chat not found")
        with pytest.raises(BotApiError, match="chat not found"):
            await c.api.call("getChat", chat_id=-5)
        fake.delay = 1.0
        # A BotApiError, as the docstring promises (it used to be a bare TimeoutError), that says the
        # request went out: Telegram may have acted on it.
        with pytest.raises(BotApiError, match=r"getChatMember failed: no answer within 0\.2 s") as late:
            await c.api.call("getChatMember", chat_id=-5, user_id=7)
        assert late.value.may_have_arrived
        fake.delay = 0.0


async def test_ctx_api_without_a_token_says_why() -> None:
    with pytest.raises(RuntimeError, match="no BOT_TOKEN"):
        await ctx(message_update(1, -5, "hi")).api.call("getChat", chat_id=-5)


async def test_ctx_api_spells_every_method_typed_and_decodes_the_result(
    fake: FakeTelegram, telegram_root: str
) -> None:
    async with httpx.AsyncClient() as http:
        c = ctx(message_update(1, -5, "hi"), ImmediateApi(BotApi(TOKEN, http, telegram_root), timeout=5))
        fake.admins[-5] = {7}
        member = await c.api.get_chat_member(chat_id=-5, user_id=7)
        assert isinstance(member, ChatMemberAdministrator) and member.user.id == 7
        assert isinstance(await c.api.get_chat_member(chat_id=-5, user_id=8), ChatMemberMember)
        sent = await c.api.send_message(
            chat_id=-5, text="now", reply_markup=inline_keyboard([button("A", "a")])
        )
        assert isinstance(sent, Message) and (sent.chat.id, sent.text) == (-5, "now")
        assert fake.calls("sendMessage")[-1].params["reply_markup"] == {
            "inline_keyboard": [[{"text": "A", "callback_data": "a"}]]
        }
        me = await c.api.get_me()
        assert isinstance(me, User) and me.username == fake.username


async def test_ctx_outbox_queues_every_method_typed_as_the_json_telegram_reads() -> None:
    c = ctx(message_update(1, -5, "hi"))
    queued = c.outbox.set_my_commands(
        commands=[BotCommand(command="hunger", description="How hungry is this chat?")],
        scope=BotCommandScopeChat(chat_id=-5),
    )
    assert isinstance(queued, QueuedCall) and await queued is queued
    assert c.calls == [
        OutgoingCall(
            "setMyCommands",
            {
                "commands": [{"command": "hunger", "description": "How hungry is this chat?"}],
                "scope": {"type": "chat", "chat_id": -5},  # the union's tag, written by the type
            },
        )
    ]


async def test_a_file_is_read_when_queued_and_raw_bytes_are_refused_with_the_way_to_send_them() -> None:
    c = ctx(message_update(1, -5, "hi"))
    c.outbox.send_photo(chat_id=-5, photo=InputFile(b"\x89PNG", filename="x.png"))
    assert c.calls[0].params == {"chat_id": -5, "photo": "attach://file0"}
    assert [(f.name, f.filename, f.data) for f in c.calls[0].files] == [("file0", "x.png", b"\x89PNG")]
    with pytest.raises(TypeError, match="photo: bytes are a file to upload: pass InputFile"):
        c.call("sendPhoto", chat_id=-5, photo=b"\x89PNG")  # was sent as a base64 str, read as a file_id
    c.outbox.send_photo(chat_id=-5, photo="AgACAgIAAxkBAAIB")  # a file_id goes as is
    assert c.calls[1] == OutgoingCall("sendPhoto", {"chat_id": -5, "photo": "AgACAgIAAxkBAAIB"})


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        ({"tag": "x\x00"}, "the payload holds a NUL character"),
        ({"ratios": [0.5, float("nan")]}, "the payload's $.ratios[1] is nan, which JSON cannot hold"),
        ({"limit": float("inf")}, "the payload's $.limit is inf, which JSON cannot hold"),
    ],
)
def test_a_timer_payload_the_database_or_json_cannot_hold_fails_the_update_that_schedules_it(
    payload: dict[str, Any], refused: str
) -> None:
    """JSON has no NaN or infinity: msgspec wrote them as null, so the fire got None where the handler
    that scheduled it had put a number, silently."""
    with pytest.raises(ValueError, match=re.escape(refused)):
        ctx(message_update(1, -7, "x")).schedule("ping", after=0, payload=payload)
