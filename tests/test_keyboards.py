"""Keyboard builders give the Bot API's types, and queue as the JSON Telegram expects."""

from __future__ import annotations

import pytest

from bot.context import BotIdentity, Context
from bot.keyboards import (
    button,
    contact_button,
    force_reply,
    inline_keyboard,
    location_button,
    remove_keyboard,
    reply_keyboard,
    url_button,
)
from bot.telegram import decode_update
from bot.testing.updates import encode, message_update
from bot.types import InlineKeyboardMarkup, ReplyKeyboardMarkup


def queued_markup(markup: object) -> object:
    ctx: Context[None] = Context(decode_update(encode(message_update(1, 5, "hi"))), BotIdentity(1, "b"))
    return ctx.reply("pick one", reply_markup=markup).params["reply_markup"]


def test_an_inline_keyboard_queues_as_rows_of_buttons() -> None:
    markup = inline_keyboard(
        [button("Yes", "vote:yes"), button("No", "vote:no")], [url_button("Docs", "https://x.y")]
    )
    assert isinstance(markup, InlineKeyboardMarkup)
    assert queued_markup(markup) == {
        "inline_keyboard": [
            [{"text": "Yes", "callback_data": "vote:yes"}, {"text": "No", "callback_data": "vote:no"}],
            [{"text": "Docs", "url": "https://x.y"}],
        ]
    }


def test_callback_data_over_64_bytes_is_refused_when_the_button_is_built() -> None:
    button("ok", "é" * 32)
    with pytest.raises(ValueError, match="65 bytes"):
        button("too long", "é" * 32 + "x")


def test_a_reply_keyboard_takes_plain_texts_and_request_buttons() -> None:
    markup = reply_keyboard(
        ["Red", "Green"], [contact_button("My number"), location_button("Where am I")], one_time=True
    )
    assert isinstance(markup, ReplyKeyboardMarkup)
    assert queued_markup(markup) == {
        "keyboard": [
            [{"text": "Red"}, {"text": "Green"}],
            [
                {"text": "My number", "request_contact": True},
                {"text": "Where am I", "request_location": True},
            ],
        ],
        "resize_keyboard": True,
        "one_time_keyboard": True,
    }
    assert queued_markup(reply_keyboard(["A"], resize=False, placeholder="Colour?", persistent=True)) == {
        "keyboard": [[{"text": "A"}]],
        "input_field_placeholder": "Colour?",
        "is_persistent": True,
    }


def test_removing_the_keyboard_and_forcing_a_reply() -> None:
    assert queued_markup(remove_keyboard()) == {"remove_keyboard": True}
    assert queued_markup(remove_keyboard(selective=True)) == {"remove_keyboard": True, "selective": True}
    assert queued_markup(force_reply(placeholder="Your answer")) == {
        "force_reply": True,
        "input_field_placeholder": "Your answer",
    }
