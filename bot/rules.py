"""Pure rules about messages: which command a message is, and whether it announces a group's upgrade.

No I/O here, so every rule is a table-driven test away.
"""

from __future__ import annotations

from dataclasses import dataclass

from .telegram import Message

__all__ = ["Command", "chat_migration", "parse_command"]


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
    entity = next((e for e in message.entities if e.type == "bot_command" and e.offset == 0), None)
    if entity is None:
        return None
    token = _utf16_prefix(text, entity.length)
    name, _, addressee = token[1:].partition("@")
    if not name or (addressee and addressee.lower() != username.lower()):
        return None
    return Command(name, text[len(token) :].strip())


def chat_migration(message: Message) -> tuple[int, int] | None:
    """(old chat id, new chat id) when the message announces a group's upgrade to a supergroup.

    Telegram sends two service messages, one in each chat, in no guaranteed order: the old chat's last
    message carries `migrate_to_chat_id`, the new chat's first carries `migrate_from_chat_id`.
    """
    if message.migrate_to_chat_id is not None:
        return message.chat.id, message.migrate_to_chat_id
    if message.migrate_from_chat_id is not None:
        return message.migrate_from_chat_id, message.chat.id
    return None
