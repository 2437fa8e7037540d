"""Inline keyboards: the `reply_markup` of a message with buttons under it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["button", "inline_keyboard", "url_button"]

# Telegram's limit on a button's callback_data, in bytes.
MAX_CALLBACK_DATA = 64


def button(text: str, data: str) -> dict[str, Any]:
    """A button that sends a callback query with `data` when pressed (`router.callback_query`)."""
    if len(data.encode()) > MAX_CALLBACK_DATA:
        raise ValueError(f"button {text!r}: callback data is {len(data.encode())} bytes, Telegram allows 64")
    return {"text": text, "callback_data": data}


def url_button(text: str, url: str) -> dict[str, Any]:
    return {"text": text, "url": url}


def inline_keyboard(*rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """`reply_markup=inline_keyboard([button("Yes", "vote:yes"), button("No", "vote:no")])`: one
    argument per row."""
    return {"inline_keyboard": [list(row) for row in rows]}
