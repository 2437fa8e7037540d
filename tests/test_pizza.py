"""The pizza app's own rules (its behaviour through the webhook is in test_app.py)."""

from __future__ import annotations

from typing import Any

import pytest

from bot.apps.pizza import PIZZA, build_bot, contains_pizza
from bot.types import Chat, Message


def message(text: str | None = None, **extra: Any) -> Message:
    return Message(message_id=1, date=0, chat=Chat(id=-1, type="group"), text=text, **extra)


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (message(PIZZA), True),
        (message(f"I want {PIZZA}{PIZZA}{PIZZA} now"), True),
        (message("pizza"), False),
        (message("\U0001f354"), False),  # a hamburger
        (message(None, caption=PIZZA), False),  # captions don't count
        (message(""), False),
        (message(None), False),
    ],
)
def test_contains_pizza_counts_text_only(msg: Message, expected: bool) -> None:
    assert contains_pizza(msg) is expected


def test_the_pizza_bot_asks_telegram_only_for_new_messages() -> None:
    assert build_bot().allowed_updates() == ["message", "channel_post"]
