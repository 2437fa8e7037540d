"""Real-shaped Telegram updates for tests and benchmarks (the fields Telegram sends, not just ours)."""

from __future__ import annotations

import json
import time
from typing import Any

from ..telegram import Update, decode_update

__all__ = ["PIZZA", "encode", "hunger", "message_update", "text_update"]

PIZZA = "\U0001f355"


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def message_update(
    update_id: int,
    chat_id: int,
    text: str | None = None,
    *,
    kind: str = "message",
    chat_type: str | None = None,
    caption: str | None = None,
    thread_id: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An Update as Telegram would send it. A text starting with "/" gets its bot_command entity."""
    if chat_type is None:
        chat_type = "private" if chat_id > 0 else ("channel" if kind == "channel_post" else "supergroup")
    chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
    if chat_type != "private":
        chat["title"] = f"Chat {chat_id}"
    if thread_id is not None:
        chat["is_forum"] = True
    message: dict[str, Any] = {
        "message_id": update_id % 1_000_000 + 1,
        "date": int(time.time()),
        "chat": chat,
    }
    if kind != "channel_post":
        message["from"] = {
            "id": 1000 + update_id % 97,
            "is_bot": False,
            "first_name": "Ann",
            "language_code": "en",
        }
    if thread_id is not None:
        message["message_thread_id"] = thread_id
        message["is_topic_message"] = True
    if text is not None:
        message["text"] = text
        if text.startswith("/"):
            command = text.split()[0]
            message["entities"] = [{"offset": 0, "length": _utf16_len(command), "type": "bot_command"}]
    if caption is not None:
        message["caption"] = caption
    message.update(extra or {})
    return {"update_id": update_id, kind: message}


def encode(update: dict[str, Any]) -> bytes:
    return json.dumps(update, ensure_ascii=False).encode()


def text_update(update_id: int, chat_id: int, text: str, **kwargs: Any) -> Update:
    return decode_update(encode(message_update(update_id, chat_id, text, **kwargs)))


def hunger(update_id: int, chat_id: int, username: str | None = None, **kwargs: Any) -> dict[str, Any]:
    return message_update(update_id, chat_id, "/hunger" + (f"@{username}" if username else ""), **kwargs)
