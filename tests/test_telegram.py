"""Decoding Telegram's updates, and the Bot API client against the fake server over real HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest

from bot.apps.pizza_testing import PIZZA
from bot.telegram import BotApi, BotApiError, InvalidUpdate, decode_update
from bot.testing.env import TOKEN, USERNAME
from bot.testing.fake_telegram import MISBEHAVIOURS, FakeTelegram, Misbehaviour
from bot.testing.updates import (
    callback_update,
    encode,
    member_update,
    message_update,
    reaction_update,
)


def test_a_group_message_decodes_with_what_the_bot_needs() -> None:
    update = decode_update(encode(message_update(7, -100123, f"/hunger@{USERNAME} {PIZZA}")))
    assert update.update_id == 7
    message = update.new_message
    assert message is not None
    assert message.chat.id == -100123
    assert message.chat.type == "supergroup"
    assert message.from_user is not None
    assert message.entities[0].type == "bot_command"
    assert update.chat == message.chat


def test_every_routed_kind_decodes_typed_and_names_its_kind() -> None:
    press = decode_update(encode(callback_update(1, -5, 7, "done:1", message_id=9)))
    assert press.kind == "callback_query"
    assert press.callback_query is not None and press.callback_query.message is not None
    assert (press.callback_query.message.message_id, press.callback_query.data) == (9, "done:1")
    member = decode_update(encode(member_update(2, -5, 7, "left", "administrator")))
    assert member.kind == "my_chat_member" and member.my_chat_member is not None
    assert member.my_chat_member.new_chat_member is not None
    assert member.my_chat_member.new_chat_member.status == "administrator"
    reaction = decode_update(encode(reaction_update(3, -5, 7, 4, "👍", "🔥")))
    assert reaction.kind == "message_reaction" and reaction.message_reaction is not None
    assert [r.emoji for r in reaction.message_reaction.new_reaction] == ["👍", "🔥"]
    edit = decode_update(encode(message_update(4, -5, "x", kind="edited_channel_post")))
    assert edit.kind == "edited_channel_post"


def test_unknown_kinds_and_fields_decode_and_are_ignored() -> None:
    raw = message_update(1, -5, "x").json()
    raw["message"]["some_future_field"] = {"nested": [1, 2]}
    assert decode_update(encode(raw)).kind == "message"
    # Every kind of Bot API 10.1 is modelled: a kind a later version adds decodes as no kind at all.
    future = decode_update(json.dumps({"update_id": 2, "future_kind": {"id": "1", "question": "?"}}).encode())
    assert (future.kind, future.chat, future.from_user) == (None, None, None)
    assert future.json()["future_kind"] == {"id": "1", "question": "?"}


def test_a_union_member_newer_than_our_bot_api_is_left_out_and_the_update_decodes() -> None:
    # Telegram adds members to its unions (a reaction, an origin, a paid medium of a new type) as it adds
    # fields. Refused, such an update was a 400 on every delivery: never applied, and its chat held up
    # while Telegram redelivered it.
    raw = message_update(1, -5, PIZZA).json()
    raw["message"]["forward_origin"] = {"type": "a_future_origin", "date": 0}
    raw["message"]["reply_to_message"] = {
        "message_id": 9,
        "date": 0,
        "chat": {"id": -5, "type": "group"},
        "paid_media": {"star_count": 1, "paid_media": [{"type": "a_future_medium"}, {"type": "preview"}]},
    }
    update = decode_update(encode(raw))
    assert update.message is not None and update.message.text == PIZZA
    assert update.message.forward_origin is None  # an optional field: as if absent
    replied = update.message.reply_to_message
    assert replied is not None and replied.paid_media is not None
    assert [m.type for m in replied.paid_media.paid_media] == ["preview"]  # a list: without it
    assert update.json()["message"]["forward_origin"]["type"] == "a_future_origin"  # kept in the raw body


def test_a_newer_member_in_a_union_of_text_lists_and_objects_is_left_out_where_it_sits() -> None:
    # A rich message's text is `str | list[part] | bold | italic | ...` (a union holding a list and
    # tagged objects), its blocks a `list[paragraph | heading | ...]`: a member newer than 10.1 at
    # any of those places leaves out that member alone (or the block that requires it), not the update.
    raw = message_update(1, -5, PIZZA).json()
    raw["message"]["rich_message"] = {
        "blocks": [
            {"type": "a_future_block", "text": "?"},
            {
                "type": "paragraph",
                "text": ["a ", {"type": "a_future_text", "text": "b"}, {"type": "bold", "text": "c"}],
            },
            {
                "type": "heading",
                "text": {"type": "italic", "text": {"type": "a_future_text", "text": "d"}},
                "size": 1,
            },
            {"type": "footer", "text": {"type": "a_future_text", "text": "e"}},
        ]
    }
    update = decode_update(encode(raw))
    assert update.message is not None and update.message.text == PIZZA
    rich = update.message.rich_message
    assert rich is not None
    assert [msgspec.to_builtins(block) for block in rich.blocks] == [
        {"type": "paragraph", "text": ["a ", {"type": "bold", "text": "c"}]},
    ]
    assert len(update.json()["message"]["rich_message"]["blocks"]) == 4  # kept in the raw body


def test_an_object_a_newer_member_is_required_by_is_left_out_in_turn() -> None:
    raw = member_update(1, -5, 7, "left", "member").json()
    raw["my_chat_member"]["new_chat_member"]["status"] = "a_future_status"
    update = decode_update(encode(raw))
    assert (update.my_chat_member, update.kind) == (None, None)  # an update of no kind: ignored
    assert update.json()["my_chat_member"]["new_chat_member"]["status"] == "a_future_status"


def test_a_newer_union_member_is_logged_once_per_place_and_tag_without_the_updates_contents(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Left out silently, an operator never learns that the Bot API types are out of date.
    def update(n: int) -> bytes:
        raw = message_update(n, -5, PIZZA).json()
        raw["message"]["forward_origin"] = {"type": "origin_for_the_log_test", "date": 0}
        raw["message"]["reply_to_message"] = {
            "message_id": 9,
            "date": 0,
            "chat": {"id": -5, "type": "group"},
            "paid_media": {
                "star_count": 1,
                "paid_media": [{"type": "medium_for_the_log_test"}, {"type": "medium_for_the_log_test"}],
            },
        }
        return encode(raw)

    with caplog.at_level(logging.WARNING, logger="bot.telegram"):
        for n in range(3):
            decode_update(update(n))
    lines = sorted(r.getMessage() for r in caplog.records)
    assert len(lines) == 2, lines
    assert "'medium_for_the_log_test' in message.reply_to_message.paid_media.paid_media[]" in lines[0]
    assert "'origin_for_the_log_test' in message.forward_origin" in lines[1]
    assert PIZZA not in caplog.text and "-5" not in caplog.text


@pytest.mark.parametrize(
    "member",
    [
        {"status": 5, "user": {"id": 9, "is_bot": False, "first_name": "B"}},  # a tag that is no name
        {"user": {"id": 9, "is_bot": False, "first_name": "B"}},  # no tag
        {"status": "member", "user": "not a user"},  # a known member, of the wrong shape
    ],
)
def test_a_union_member_that_cannot_be_left_out_is_still_not_an_update(member: dict[str, object]) -> None:
    raw = member_update(1, -5, 7, "left", "member").json()
    raw["my_chat_member"]["new_chat_member"] = member
    with pytest.raises(InvalidUpdate, match="not a Telegram Update"):
        decode_update(encode(raw))


def test_channel_posts_are_new_messages_and_edits_are_not() -> None:
    post = decode_update(encode(message_update(1, -5, PIZZA, kind="channel_post")))
    edit = decode_update(encode(message_update(2, -5, PIZZA, kind="edited_message")))
    assert post.new_message is not None
    assert edit.new_message is None
    assert edit.chat is not None
    assert edit.chat.id == -5


def test_forum_topics_and_captions_are_kept_apart() -> None:
    update = decode_update(encode(message_update(1, -5, None, caption=PIZZA, thread_id=9)))
    message = update.message
    assert message is not None
    assert (message.text, message.caption, message.message_thread_id, message.is_topic_message) == (
        None,
        PIZZA,
        9,
        True,
    )


def test_unknown_fields_at_every_level_are_ignored() -> None:
    raw = message_update(1, -5, PIZZA).json()
    raw["brand_new_field"] = {"x": [1, 2]}
    raw["message"]["chat"]["emoji_status"] = "🙂"
    raw["message"]["future_story"] = {"id": 3}
    raw["message"]["from"]["is_premium"] = True
    update = decode_update(json.dumps(raw).encode())
    assert update.message is not None and update.message.from_user is not None
    assert update.message.from_user.is_premium is True  # a field the old hand-written User did not have
    assert update.json() == raw  # ...and the ones no version models, kept in the raw JSON


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"\xff", "not JSON"),
        (b'{"update_id": 1, "message": {"text": "\xc3\x28"}}', "not JSON"),
        (b"[]", "not a Telegram Update"),
        (b"{}", "update_id"),
        (b'{"update_id": "1"}', "update_id"),
        (b'{"update_id": 1.5}', "update_id"),
        (b'{"update_id": true}', "update_id"),
        (b'{"update_id": 9223372036854775808}', "update_id"),
        (
            b'{"update_id": 1, "message": {"message_id": 1, "chat": {"id": -1e30, "type": "group"}}}',
            "chat.id",
        ),
        (b'{"update_id": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    ],
)
def test_what_is_not_an_update_is_refused_with_a_reason(body: bytes, complaint: str) -> None:
    with pytest.raises(InvalidUpdate, match=complaint):
        decode_update(body)


@pytest.fixture
async def api(telegram_root: str) -> AsyncIterator[BotApi]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield BotApi(TOKEN, client, telegram_root, timeout=2)


@pytest.mark.anyio
async def test_get_me_and_send_message_over_http(api: BotApi, fake: FakeTelegram) -> None:
    me = await api.get_me()
    assert (me.id, me.username, me.can_read_all_group_messages) == (123456789, USERNAME, True)
    sent = await api.call("sendMessage", {"chat_id": -5, "text": "hi", "message_thread_id": 3})
    assert sent["text"] == "hi"
    assert fake.sent_messages(-5) == [{"chat_id": -5, "text": "hi", "message_thread_id": 3}]


@pytest.mark.anyio
async def test_bot_api_errors_carry_code_description_and_retry_after(api: BotApi, fake: FakeTelegram) -> None:
    fake.fail_next(
        "sendMessage", error_code=429, description="Too Many Requests: retry after 7", retry_after=7
    )
    with pytest.raises(BotApiError) as caught:
        await api.call("sendMessage", {"chat_id": 1, "text": "x"})
    assert (caught.value.error_code, caught.value.retry_after, caught.value.permanent) == (429, 7.0, False)
    with pytest.raises(BotApiError) as caught:
        await api.call("sendMessage", {"chat_id": 1, "text": ""})
    assert caught.value.error_code == 400
    assert caught.value.permanent
    assert "message text is empty" in str(caught.value)


@pytest.mark.anyio
async def test_a_group_that_became_a_supergroup_says_where_it_went(api: BotApi, fake: FakeTelegram) -> None:
    fake.migrated[-5] = -1005
    with pytest.raises(BotApiError, match="upgraded to a supergroup") as caught:
        await api.call("sendMessage", {"chat_id": -5, "text": "x"})
    assert (caught.value.error_code, caught.value.migrate_to_chat_id) == (400, -1005)
    assert fake.delivered_messages() == []


@pytest.mark.anyio
async def test_a_trickling_answer_ends_at_the_total_deadline(fake: FakeTelegram, telegram_root: str) -> None:
    # Headers at once, then a byte every 0.1 s: httpx's timeouts are per read (5 s here), so only the
    # call's total deadline ends it; it used to last as long as the answer did (an hour).
    fake.trickle_interval = 0.1
    fake.misbehave_next("getMe", "trickle")
    async with httpx.AsyncClient(timeout=5) as client, asyncio.timeout(30):
        with pytest.raises(BotApiError, match=r"getMe failed: no answer within 1 s") as caught:
            await BotApi(TOKEN, client, telegram_root, timeout=1).get_me()
    assert caught.value.may_have_arrived and not caught.value.permanent
    await fake.wait_for_async(lambda: fake.most_at_once("getMe") == 1 and not fake.in_flight("getMe"))


@pytest.mark.anyio
async def test_the_deadline_is_set_per_call_too(fake: FakeTelegram, telegram_root: str) -> None:
    fake.delay = 0.5
    async with httpx.AsyncClient(timeout=5) as client:
        api = BotApi(TOKEN, client, telegram_root, timeout=0.2)
        assert (await api.call("getMe", timeout=5))["username"] == fake.username
        with pytest.raises(BotApiError, match=r"no answer within 0\.2 s"):
            await api.call("getMe")


@pytest.mark.anyio
async def test_an_unreachable_bot_api_is_a_bot_api_error() -> None:
    async with httpx.AsyncClient(timeout=2) as client:
        with pytest.raises(BotApiError, match="no connection to the Bot API"):
            await BotApi(TOKEN, client, "http://127.0.0.1:9").call("getMe")


@pytest.mark.anyio
@pytest.mark.parametrize("kind", MISBEHAVIOURS)
async def test_every_broken_answer_is_a_retryable_bot_api_error(
    api: BotApi, fake: FakeTelegram, kind: Misbehaviour
) -> None:
    fake.misbehave_next("sendMessage", kind)
    with pytest.raises(BotApiError) as caught:
        await api.call("sendMessage", {"chat_id": 1, "text": "x"})
    assert not caught.value.permanent
    # The request went out and its answer was lost or unreadable: Telegram may have acted on it. Only a
    # readable `ok: false` says for sure that it did not.
    assert caught.value.may_have_arrived == (kind != "ok_false_200")
    assert fake.delivered_messages() == []
    # The shared client is still usable: the next call goes through.
    assert (await api.call("sendMessage", {"chat_id": 1, "text": "x"}))["text"] == "x"


@pytest.mark.anyio
async def test_a_read_timeout_may_have_arrived_and_a_refused_connection_did_not(
    fake: FakeTelegram, telegram_root: str
) -> None:
    fake.delay = 1.0
    async with httpx.AsyncClient(timeout=httpx.Timeout(0.2, connect=2)) as client:
        with pytest.raises(BotApiError) as late:
            await BotApi(TOKEN, client, telegram_root).call("sendMessage", {"chat_id": 1, "text": "x"})
        with pytest.raises(BotApiError) as refused:
            await BotApi(TOKEN, client, "http://127.0.0.1:9").call("sendMessage", {"chat_id": 1, "text": "x"})
    assert (late.value.may_have_arrived, late.value.permanent) == (True, False)
    assert (refused.value.may_have_arrived, refused.value.permanent) == (False, False)
    # Telegram carries on with a call whose answer we stopped waiting for: exactly why a retry can double.
    await fake.wait_for_async(lambda: len(fake.delivered_messages(1)) == 1, timeout=5)
