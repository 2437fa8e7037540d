"""Keyboards: the `reply_markup` of a message, built from typed parts.

Inline keyboards sit under a message (`inline_keyboard(row(button("Yes", "vote:yes")), ...)`); reply
keyboards replace the user's keyboard (`reply_keyboard(["Red", "Green"], ["Cancel"])`) until
`remove_keyboard()`; `force_reply()` opens a reply to the bot's message. Each returns the Bot API type
(`bot.types.InlineKeyboardMarkup`, ...), so `reply_markup=` takes any of them, in `ctx.reply` as in
`ctx.outbox.send_message`.
"""

from __future__ import annotations

from collections.abc import Iterable

from .types import (
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    KeyboardButton,
    ReplyKeyboardMarkup,
    ReplyKeyboardRemove,
)

__all__ = [
    "MAX_CALLBACK_DATA",
    "button",
    "contact_button",
    "force_reply",
    "inline_keyboard",
    "location_button",
    "remove_keyboard",
    "reply_keyboard",
    "url_button",
]

# Telegram's limit on a button's callback_data, in bytes.
MAX_CALLBACK_DATA = 64


def button(text: str, data: str) -> InlineKeyboardButton:
    """A button that sends a callback query with `data` when pressed (`router.callback_query`)."""
    if len(data.encode()) > MAX_CALLBACK_DATA:
        raise ValueError(f"button {text!r}: callback data is {len(data.encode())} bytes, Telegram allows 64")
    return InlineKeyboardButton(text=text, callback_data=data)


def url_button(text: str, url: str) -> InlineKeyboardButton:
    """A button that opens `url`."""
    return InlineKeyboardButton(text=text, url=url)


def inline_keyboard(*rows: Iterable[InlineKeyboardButton]) -> InlineKeyboardMarkup:
    """`reply_markup=inline_keyboard([button("Yes", "vote:yes"), button("No", "vote:no")])`: one
    argument per row."""
    return InlineKeyboardMarkup(inline_keyboard=[list(row) for row in rows])


def contact_button(text: str) -> KeyboardButton:
    """A reply keyboard button that sends the user's phone number (private chats only)."""
    return KeyboardButton(text=text, request_contact=True)


def location_button(text: str) -> KeyboardButton:
    """A reply keyboard button that sends the user's location (private chats only)."""
    return KeyboardButton(text=text, request_location=True)


def reply_keyboard(
    *rows: Iterable[str | KeyboardButton],
    resize: bool = True,
    one_time: bool = False,
    placeholder: str | None = None,
    persistent: bool = False,
    selective: bool = False,
) -> ReplyKeyboardMarkup:
    """A keyboard in place of the user's, one argument per row; a str is a button that sends its text.

    `resize` fits it to its buttons (Telegram's default is a full-height keyboard, which few bots want),
    `one_time` hides it after a press, `placeholder` shows in the input field, `persistent` keeps it
    shown when the user opens their own keyboard, and `selective` shows it only to the users the
    message mentions or replies to.
    """
    return ReplyKeyboardMarkup(
        keyboard=[[KeyboardButton(text=b) if isinstance(b, str) else b for b in row] for row in rows],
        resize_keyboard=resize or None,
        one_time_keyboard=one_time or None,
        input_field_placeholder=placeholder,
        is_persistent=persistent or None,
        selective=selective or None,
    )


def remove_keyboard(*, selective: bool = False) -> ReplyKeyboardRemove:
    """Take a reply keyboard away (Telegram's own keyboard comes back)."""
    return ReplyKeyboardRemove(remove_keyboard=True, selective=selective or None)


def force_reply(*, placeholder: str | None = None, selective: bool = False) -> ForceReply:
    """Open a reply to this message in the user's client, as if they had chosen "Reply": for a
    question whose answer the bot waits for, even in privacy mode (a reply to the bot reaches it)."""
    return ForceReply(force_reply=True, input_field_placeholder=placeholder, selective=selective or None)
