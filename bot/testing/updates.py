"""Real-shaped Telegram updates for tests and benchmarks (the fields Telegram sends, not just ours).

Every builder returns an `Update`, decoded from the JSON it was built as, as the webhook would decode it:
`update.raw` is that JSON (what `encode` posts), `update.json()` it as a dict to change. Each user has a
name of their own (`user(7)` is not `user(8)`), so a test can tell from a reply who it was for.
"""

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
    "inline_query_update",
    "member_update",
    "message_update",
    "pre_checkout_update",
    "reaction_update",
    "successful_payment_update",
    "text_fields",
    "text_update",
    "update",
    "user",
]

_NAMES = ("Ann", "Bob", "Cleo", "Dev", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max")
_LANGUAGES = ("en", "de", "es", "uk", "pt-br")


def user(user_id: int, first_name: str | None = None, *, is_bot: bool = False) -> dict[str, Any]:
    """A User as Telegram sends it; by default a name and language of its own, picked by its id."""
    name = first_name or _NAMES[user_id % len(_NAMES)]
    found: dict[str, Any] = {"id": user_id, "is_bot": is_bot, "first_name": name}
    if not is_bot:
        found["last_name"] = f"No{user_id % 1000}"
        found["language_code"] = _LANGUAGES[user_id % len(_LANGUAGES)]
    found["username"] = f"{name.lower()}{user_id % 1000}" + ("_bot" if is_bot else "")
    return found


def update(body: dict[str, Any]) -> Update:
    """An Update from its JSON, as the webhook decodes it (`raw` keeps every field, known or not)."""
    return decode_update(json.dumps(body, ensure_ascii=False).encode())


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
) -> Update:
    """An Update as Telegram would send it. A text starting with "/" gets its bot_command entity. The
    sender is `from_id`, else one of 97 users picked by the update id; `extra` adds message fields
    (a photo, a successful_payment...)."""
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
    return update({"update_id": update_id, kind: message})


def encode(update: Update | dict[str, Any]) -> bytes:
    """A webhook body: an Update's raw JSON (what it was decoded from), or a dict as JSON."""
    if isinstance(update, Update):
        return update.raw
    return json.dumps(update, ensure_ascii=False).encode()


def text_update(update_id: int, chat_id: int, text: str, **kwargs: Any) -> Update:
    """A text message (`message_update` with a text)."""
    return message_update(update_id, chat_id, text, **kwargs)


def command_update(
    update_id: int, chat_id: int, name: str, username: str | None = None, **kwargs: Any
) -> Update:
    """`/name`, or `/name@username` when a username is given (a bot_command entity at offset 0)."""
    return message_update(update_id, chat_id, f"/{name}" + (f"@{username}" if username else ""), **kwargs)


def callback_update(
    update_id: int, chat_id: int, from_id: int, data: str, *, message_id: int = 1, text: str = "…"
) -> Update:
    """A press on a button of message `message_id` (a message the bot sent) in `chat_id`."""
    return update(
        {
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
    )


def inline_query_update(update_id: int, from_id: int, query: str, *, offset: str = "") -> Update:
    """User `from_id` typed `@bot query` in a chat (inline mode)."""
    return update(
        {
            "update_id": update_id,
            "inline_query": {
                "id": f"q{update_id}",
                "from": user(from_id),
                "query": query,
                "offset": offset,
                "chat_type": "sender",
            },
        }
    )


def pre_checkout_update(
    update_id: int, from_id: int, payload: str, total_amount: int, *, currency: str = "XTR"
) -> Update:
    """The last step of a payment: Telegram asks the bot to confirm the order (answerPreCheckoutQuery)
    within 10 seconds. XTR is Telegram Stars."""
    return update(
        {
            "update_id": update_id,
            "pre_checkout_query": {
                "id": f"pcq{update_id}",
                "from": user(from_id),
                "currency": currency,
                "total_amount": total_amount,
                "invoice_payload": payload,
            },
        }
    )


def successful_payment_update(
    update_id: int, chat_id: int, from_id: int, payload: str, total_amount: int, *, currency: str = "XTR"
) -> Update:
    """The service message that a payment went through: what a bot applies (once)."""
    payment = {
        "currency": currency,
        "total_amount": total_amount,
        "invoice_payload": payload,
        "telegram_payment_charge_id": f"charge-{update_id}",
        "provider_payment_charge_id": "" if currency == "XTR" else f"provider-{update_id}",
    }
    return message_update(update_id, chat_id, None, from_id=from_id, extra={"successful_payment": payment})


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
) -> Update:
    """`my_chat_member`: user `from_id` changed the bot's status in the chat, e.g. "left" → "member"."""
    bot = user(bot_id, "Bot", is_bot=True)
    return update(
        {
            "update_id": update_id,
            "my_chat_member": {
                "chat": _chat(chat_id),
                "from": user(from_id),
                "date": int(time.time()),
                "old_chat_member": chat_member(old, bot),
                "new_chat_member": chat_member(new, bot),
            },
        }
    )


def reaction_update(update_id: int, chat_id: int, from_id: int, message_id: int, *emoji: str) -> Update:
    """`message_reaction`: the user's reactions to the message are now `emoji`."""
    return update(
        {
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
    )
