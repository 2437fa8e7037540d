"""What an update is about, whatever its kind: the methods of `bot.types.Update` that are not fields.

`Update` (generated from the Bot API) mixes this in. Every kind's object is found by name: the kinds
holding a Message are listed here, and the rest have a `chat`, a `from_user` or a `user` where they
have one (tests/test_types.py checks both against the schema, so a new Bot API version cannot slip by).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

if TYPE_CHECKING:
    from .types import CallbackQuery, Chat, Message, User

__all__ = ["MESSAGE_KINDS", "UpdateMixin"]

# The update kinds whose object is a Message.
MESSAGE_KINDS = (
    "message",
    "edited_message",
    "channel_post",
    "edited_channel_post",
    "business_message",
    "edited_business_message",
    "guest_message",
)


class UpdateMixin:
    __slots__ = ()

    if TYPE_CHECKING:  # Update's fields that these methods read
        __struct_fields__: ClassVar[tuple[str, ...]]
        message: Message | None
        channel_post: Message | None
        callback_query: CallbackQuery | None

    @property
    def kind(self) -> str | None:
        """Which kind of update this is (one of UPDATE_KINDS); None for a kind newer than this Bot API."""
        for name in self.__struct_fields__[1:]:  # after update_id, the kinds, in the API's order
            if getattr(self, name) is not None:
                return name
        return None

    @property
    def event(self) -> Any:
        """The object of this update's kind (a Message, a CallbackQuery, a PollAnswer...), or None."""
        kind = self.kind
        return None if kind is None else getattr(self, kind)

    @property
    def new_message(self) -> Message | None:
        """A newly sent message in any kind of chat: what counting and commands look at."""
        return self.message or self.channel_post

    @property
    def any_message(self) -> Message | None:
        """The message this update is about: new, edited, a business one, or the one a pressed button is
        attached to."""
        kind = self.kind
        if kind in MESSAGE_KINDS:
            message: Message = getattr(self, kind)
            return message
        if self.callback_query is not None:
            return self.callback_query.message
        return None

    @property
    def chat(self) -> Chat | None:
        """The chat this update happened in; None for kinds without one (an inline query, a poll...)."""
        message = self.any_message
        if message is not None:
            return message.chat
        chat: Chat | None = getattr(self.event, "chat", None)
        return chat

    @property
    def from_user(self) -> User | None:
        """Who caused this update; None for channel posts, anonymous reactions and kinds without one."""
        event = self.event
        user: User | None = getattr(event, "from_user", None) or getattr(event, "user", None)
        return user

    # --- raw access --------------------------------------------------------------------------------

    def keep_raw(self, body: bytes) -> None:
        """Remember the JSON this update was decoded from (`decode_update` does)."""
        vars(self)["_raw"] = body

    @property
    def raw(self) -> bytes:
        """The update's JSON as Telegram sent it, including fields this Bot API version does not model;
        for an Update built in code, its fields encoded."""
        raw: bytes | None = vars(self).get("_raw")
        return raw if raw is not None else msgspec.json.encode(self)

    def json(self) -> dict[str, Any]:
        """The update as JSON values, decoded from `raw` on each call: the way to a field newer than
        this Bot API version (`ctx.update.json()["message"]["some_new_field"]`)."""
        decoded: dict[str, Any] = msgspec.json.decode(self.raw)
        return decoded
