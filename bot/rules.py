"""Pure rules about messages: which command a message is (and the entity Telegram gives one), and whether
it announces a group's upgrade.

No I/O here, so every rule is a table-driven test away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import BotError
from .types import Message

__all__ = [
    "ChatMigration",
    "Command",
    "ImplausibleMigration",
    "chat_migration",
    "parse_command",
    "text_fields",
]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: str


def _utf16_prefix(text: str, units: int) -> str:
    # Entity offsets and lengths count UTF-16 code units, not Python characters.
    return text.encode("utf-16-le")[: 2 * units].decode("utf-16-le", errors="ignore")


def parse_command(message: Message, username: str) -> Command | None:
    """The command this message gives *this* bot, if any.

    A command is a `bot_command` entity at offset 0: `/name`, or `/name@username` where username is ours
    (compared without case, as Telegram does). `/name@other_bot` is for another bot in the group.
    """
    text = message.text
    if not text:
        return None
    entity = next((e for e in message.entities or () if e.type == "bot_command" and e.offset == 0), None)
    if entity is None:
        return None
    token = _utf16_prefix(text, entity.length)
    name, _, addressee = token[1:].partition("@")
    if not name or (addressee and addressee.lower() != username.lower()):
        return None
    return Command(name, text[len(token) :].strip())


def text_fields(text: str) -> dict[str, Any]:
    """A message's `text`, with the bot_command entity Telegram adds when it starts with "/" (offsets and
    lengths count UTF-16 code units, as the Bot API does)."""
    fields: dict[str, Any] = {"text": text}
    if text.startswith("/"):
        command = text.split(maxsplit=1)[0]
        length = len(command.encode("utf-16-le")) // 2
        fields["entities"] = [{"offset": 0, "length": length, "type": "bot_command"}]
    return fields


# Bot API chat ids (core.telegram.org/api/bots/ids): a basic group is -id with 1 <= id <= 999999999999;
# supergroups and channels are -(10^12 + id), private chats positive.
_SUPERGROUP_IDS_FROM = -(10**12)


@dataclass(frozen=True, slots=True)
class ChatMigration:
    old_chat_id: int
    new_chat_id: int


class ImplausibleMigration(BotError, ValueError):
    """A message claims a chat migration that Telegram never sends; the message says why."""


def chat_migration(message: Message) -> ChatMigration | None:
    """The move a message announces when a group is upgraded to a supergroup, if it announces one.

    Telegram sends two service messages, one in each chat, in no guaranteed order: the old group's last
    message carries `migrate_to_chat_id`, the new supergroup's first carries `migrate_from_chat_id`.
    Only a basic group ("group") is ever upgraded. Anything else (both ids the same, a private chat or a
    channel as the source) raises ImplausibleMigration: followed, it would double a count or carry off
    another chat's.
    """
    chat = message.chat
    if message.migrate_to_chat_id is not None:
        if chat.type != "group":
            raise ImplausibleMigration(f"migrate_to_chat_id in a {chat.type} chat: only a group is upgraded")
        old, new = chat.id, message.migrate_to_chat_id
    elif message.migrate_from_chat_id is not None:
        old, new = message.migrate_from_chat_id, chat.id
        if chat.type != "supergroup":
            raise ImplausibleMigration(
                f"migrate_from_chat_id in a {chat.type} chat: only a supergroup comes from a group"
            )
        if not _SUPERGROUP_IDS_FROM < old < 0:
            raise ImplausibleMigration(f"migrate_from_chat_id {old} is not the id of a group")
    else:
        return None
    if old == new:
        raise ImplausibleMigration(f"chat {old} cannot migrate to itself")
    return ChatMigration(old, new)
