"""Real-shaped Telegram updates for tests and benchmarks (the fields Telegram sends, not just ours)."""

from __future__ import annotations

import json
import time
from typing import Any

from ..rules import text_fields
from ..telegram import decode_update
from ..types import Update

__all__ = [
    "callback_update",
    "chat_member",
    "command_update",
    "encode",
    "member_update",
    "message_update",
    "reaction_update",
    "text_fields",
    "text_update",
    "user",
]


def user(user_id: int, first_name: str = "Ann", *, is_bot: bool = False) -> dict[str, Any]:
    return {"id": user_id, "is_bot": is_bot, "first_name": first_name, "language_code": "en"}


def _chat(chat_id: int, chat_type: str | None = None) -> dict[str, Any]:
    chat_type = chat_type or ("private" if chat_id > 0 else "supergroup")
    chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
    if chat_type != "private":
        chat["title"] = f"Chat {chat_id}"
    return chat


def message_update(
    update_id: int,
    chat_id: int,
    text: str | None = None,
    *,
    kind: str = "message",
    chat_type: str | None = None,
    caption: str | None = None,
    thread_id: int | None = None,
    from_id: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An Update as Telegram would send it. A text starting with "/" gets its bot_command entity. The
    sender is `from_id`, else one of 97 users picked by the update id."""
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
        message["from"] = user(from_id if from_id is not None else 1000 + update_id % 97)
    if thread_id is not None:
        message["message_thread_id"] = thread_id
        message["is_topic_message"] = True
    if text is not None:
        message.update(text_fields(text))
    if caption is not None:
        message["caption"] = caption
    message.update(extra or {})
    return {"update_id": update_id, kind: message}


def encode(update: Update | dict[str, Any]) -> bytes:
    """A webhook body: an Update's raw JSON (what it was decoded from), or a dict as JSON."""
    if isinstance(update, Update):
        return update.raw
    return json.dumps(update, ensure_ascii=False).encode()


def text_update(update_id: int, chat_id: int, text: str, **kwargs: Any) -> Update:
    return decode_update(encode(message_update(update_id, chat_id, text, **kwargs)))


def command_update(
    update_id: int, chat_id: int, name: str, username: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    """`/name`, or `/name@username` when a username is given (a bot_command entity at offset 0)."""
    return message_update(update_id, chat_id, f"/{name}" + (f"@{username}" if username else ""), **kwargs)


def callback_update(
    update_id: int, chat_id: int, from_id: int, data: str, *, message_id: int = 1, text: str = "…"
) -> dict[str, Any]:
    """A press on a button of message `message_id` (a message the bot sent) in `chat_id`."""
    return {
        "update_id": update_id,
        "callback_query": {
            "id": f"{update_id}{from_id}",
            "from": user(from_id),
            "chat_instance": str(-chat_id),
            "message": {
                "message_id": message_id,
                "from": user(1, "Bot", is_bot=True),
                "chat": _chat(chat_id),
                "date": int(time.time()),
                "text": text,
            },
            "data": data,
        },
    }


# The fields Telegram sends with each member status (the Bot API's required ones); an administrator is a
# bot added with the rights a group offers by default.
_RESTRICTED = [
    "can_send_messages",
    "can_send_audios",
    "can_send_documents",
    "can_send_photos",
    "can_send_videos",
    "can_send_video_notes",
    "can_send_voice_notes",
    "can_send_polls",
    "can_send_other_messages",
    "can_add_web_page_previews",
    "can_react_to_messages",
    "can_edit_tag",
    "can_change_info",
    "can_invite_users",
    "can_pin_messages",
    "can_manage_topics",
]
_ADMIN_RIGHTS = {
    "can_be_edited": False,
    "is_anonymous": False,
    "can_manage_chat": True,
    "can_delete_messages": True,
    "can_manage_video_chats": True,
    "can_restrict_members": True,
    "can_promote_members": False,
    "can_change_info": True,
    "can_invite_users": True,
    "can_post_stories": False,
    "can_edit_stories": False,
    "can_delete_stories": False,
}
_MEMBER_FIELDS: dict[str, dict[str, Any]] = {
    "creator": {"is_anonymous": False},
    "administrator": _ADMIN_RIGHTS,
    "member": {},
    "restricted": {"is_member": True, **dict.fromkeys(_RESTRICTED, False), "until_date": 0},
    "left": {},
    "kicked": {"until_date": 0},
}


def chat_member(status: str, member: dict[str, Any]) -> dict[str, Any]:
    """A ChatMember as Telegram sends it: `member` (a `user(...)`) with this status."""
    return {"status": status, "user": member, **_MEMBER_FIELDS[status]}


def member_update(
    update_id: int, chat_id: int, from_id: int, old: str, new: str, *, bot_id: int = 1
) -> dict[str, Any]:
    """`my_chat_member`: user `from_id` changed the bot's status in the chat, e.g. "left" → "member"."""
    bot = user(bot_id, "Bot", is_bot=True)
    return {
        "update_id": update_id,
        "my_chat_member": {
            "chat": _chat(chat_id),
            "from": user(from_id),
            "date": int(time.time()),
            "old_chat_member": chat_member(old, bot),
            "new_chat_member": chat_member(new, bot),
        },
    }


def reaction_update(
    update_id: int, chat_id: int, from_id: int, message_id: int, *emoji: str
) -> dict[str, Any]:
    """`message_reaction`: the user's reactions to the message are now `emoji`."""
    return {
        "update_id": update_id,
        "message_reaction": {
            "chat": _chat(chat_id),
            "message_id": message_id,
            "user": user(from_id),
            "date": int(time.time()),
            "old_reaction": [],
            "new_reaction": [{"type": "emoji", "emoji": e} for e in emoji],
        },
    }
