"""The playground's chats, people and ids, and the Telegram-shaped updates it builds from them.

Every id it makes is at least 2**52: Telegram's chat ids have at most 52 significant bits and its update
ids fit in 32, so nothing the playground sends can ever be mistaken for (or collide with) a real chat or
a real update, even in a bot that also serves Telegram (PLAYGROUND=1 with a token). Below 2**53, the ids
stay exact as JavaScript numbers in the page.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec

from ..rules import text_fields

__all__ = [
    "PEOPLE",
    "ChatRef",
    "Ids",
    "Person",
    "is_playground_id",
    "message_update",
    "telegram_chat",
]

BASE = 2**52
# Clock-made ids count microseconds from here: 2025-01-01 UTC, which leaves room for a century.
_EPOCH_US = 1_735_689_600_000_000
ChatType = Literal["group", "supergroup", "private", "channel"]


def is_playground_id(value: int) -> bool:
    return BASE <= abs(value) < 2 * BASE


PlaygroundId = Annotated[int, msgspec.Meta(ge=-(2 * BASE - 1), le=2 * BASE - 1)]


class Person(msgspec.Struct, frozen=True):
    id: int
    first_name: str


PEOPLE = (Person(BASE + 1, "Ann"), Person(BASE + 2, "Bob"), Person(BASE + 3, "Cleo"))


class ChatRef(msgspec.Struct, frozen=True):
    """A chat as the page and `python -m bot chat` describe it (title: a private chat's first name)."""

    id: PlaygroundId
    type: ChatType
    title: Annotated[str, msgspec.Meta(max_length=128)] = ""
    is_forum: bool = False

    def __post_init__(self) -> None:
        if not is_playground_id(self.id):
            raise ValueError(f"chat id {self.id} is not a playground chat (|id| >= 2**52)")


class Ids:
    """Ids from the clock (µs since 2025), one apart at least, and above any id `seen` (the database's
    latest, so a clock set back since the last run cannot repeat an update id: a repeated one would be
    taken for a redelivery and dropped). Unique across processes unless two ask in the same µs."""

    def __init__(self) -> None:
        self._last = 0

    def seen(self, used: int) -> None:
        if is_playground_id(used):
            self._last = max(self._last, used - BASE)

    def next(self) -> int:
        self._last = max(self._last + 1, time.time_ns() // 1000 - _EPOCH_US)
        return BASE + self._last


def telegram_chat(chat: ChatRef) -> dict[str, Any]:
    """The chat as a Telegram Chat object."""
    shown: dict[str, Any] = {"id": chat.id, "type": chat.type}
    shown["first_name" if chat.type == "private" else "title"] = chat.title
    if chat.is_forum:
        shown["is_forum"] = True
    return shown


def message_update(
    update_id: int,
    chat: ChatRef,
    sender: Person | None,
    *,
    text: str | None = None,
    thread_id: int | None = None,
    **service: Any,
) -> dict[str, Any]:
    """An Update as Telegram sends it: a channel's posts come from the channel, everything else from a
    person; a text starting with "/" carries its bot_command entity; `service` adds fields such as
    migrate_to_chat_id."""
    shown = telegram_chat(chat)
    message: dict[str, Any] = {"message_id": update_id - BASE, "date": int(time.time()), "chat": shown}
    if chat.type == "channel":
        message["sender_chat"] = shown
    elif sender is not None:
        message["from"] = {"id": sender.id, "is_bot": False, "first_name": sender.first_name}
    if thread_id is not None:
        message["message_thread_id"] = thread_id
        message["is_topic_message"] = True
    if text is not None:
        message.update(text_fields(text))
    message.update(service)
    return {"update_id": update_id, "channel_post" if chat.type == "channel" else "message": message}
