from __future__ import annotations

from typing import Any

import pytest

from bot.rules import ChatMigration, Command, ImplausibleMigration, chat_migration, parse_command
from bot.types import Chat, Message, MessageEntity

PIZZA = "\U0001f355"


def message(text: str | None = None, *, command_len: int | None = None, **extra: Any) -> Message:
    if command_len is not None:
        extra["entities"] = [MessageEntity(type="bot_command", offset=0, length=command_len)]
    return Message(message_id=1, date=0, chat=Chat(id=-1, type="group"), text=text, **extra)


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (message("/hunger", command_len=7), Command("hunger", "")),
        (message("/hunger@pizza_bot", command_len=17), Command("hunger", "")),
        (message("/hunger@Pizza_Bot", command_len=17), Command("hunger", "")),
        (message("/hunger now please", command_len=7), Command("hunger", "now please")),
        (message("/hunger@pizza_bot  now", command_len=17), Command("hunger", "now")),
        (message("/hunger@other_bot", command_len=17), None),
        (message("/hunger", command_len=None), None),  # no bot_command entity: plain text
        (
            message("say /hunger", entities=[MessageEntity(type="bot_command", offset=4, length=7)]),
            None,
        ),  # not at offset 0
        (message(None, caption="/hunger"), None),
        (message("/", command_len=1), None),
        (message("/@pizza_bot", command_len=11), None),
    ],
)
def test_parse_command_accepts_only_our_commands_at_offset_zero(
    msg: Message, expected: Command | None
) -> None:
    assert parse_command(msg, "pizza_bot") == expected


def test_parse_command_measures_entities_in_utf16_units() -> None:
    # "/hunger" then a 🍕 (two UTF-16 units): the entity covers 7 units, the text after it is the pizza.
    msg = message(f"/hunger{PIZZA}", command_len=7)
    assert parse_command(msg, "pizza_bot") == Command("hunger", PIZZA)


def service(chat_id: int, chat_type: str, **ids: int) -> Message:
    return Message(message_id=1, date=0, chat=Chat(id=chat_id, type=chat_type), **ids)


GROUP, SUPERGROUP = -4001, -1_000_000_004_001


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (service(GROUP, "group", migrate_to_chat_id=SUPERGROUP), ChatMigration(GROUP, SUPERGROUP)),
        (service(SUPERGROUP, "supergroup", migrate_from_chat_id=GROUP), ChatMigration(GROUP, SUPERGROUP)),
        (service(GROUP, "group"), None),
        (service(GROUP, "group", migrate_to_chat_id=GROUP), "cannot migrate to itself"),
        (service(GROUP, "supergroup", migrate_from_chat_id=GROUP), "cannot migrate to itself"),
        (
            service(SUPERGROUP, "supergroup", migrate_to_chat_id=-1_000_000_000_009),
            "only a group is upgraded",
        ),
        (service(77, "private", migrate_to_chat_id=SUPERGROUP), "only a group is upgraded"),
        (service(SUPERGROUP, "supergroup", migrate_from_chat_id=77), "not the id of a group"),
        (service(SUPERGROUP, "supergroup", migrate_from_chat_id=-1_000_000_000_009), "not the id of a group"),
        (service(SUPERGROUP, "channel", migrate_from_chat_id=GROUP), "only a supergroup comes from a group"),
    ],
)
def test_chat_migration_believes_only_a_group_becoming_a_supergroup(
    msg: Message, expected: ChatMigration | str | None
) -> None:
    if isinstance(expected, str):
        with pytest.raises(ImplausibleMigration, match=expected):
            chat_migration(msg)
    else:
        assert chat_migration(msg) == expected
