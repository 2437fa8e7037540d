"""What a handler gets: the update, the bot's identity, its sessions, and a queue for outgoing calls."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .session import NoSessionKey, SessionSlot
from .storage import OutgoingCall
from .telegram import Chat, Message, Update

__all__ = ["BotIdentity", "Context"]

S = TypeVar("S")

DEFAULT_SESSION = "session"


@dataclass(frozen=True, slots=True)
class BotIdentity:
    """Who this bot is: its id (the number before the colon in its token) and its username."""

    id: int
    username: str


class Context(Generic[S]):
    def __init__(self, update: Update, me: BotIdentity, slots: Mapping[str, SessionSlot[Any]]) -> None:
        self.update = update
        self.me = me
        self.calls: list[OutgoingCall] = []
        self._slots = slots

    @property
    def message(self) -> Message | None:
        return self.update.new_message

    @property
    def chat(self) -> Chat | None:
        return self.update.chat

    def _slot(self, name: str) -> SessionSlot[Any]:
        try:
            return self._slots[name]
        except KeyError:
            raise NoSessionKey(f"no session named {name!r} is configured for this bot") from None

    @property
    def session(self) -> S:
        """The update's session, loaded before the handler ran (see `get_session` for lazy ones)."""
        value: S = self._slot(DEFAULT_SESSION).get()
        return value

    @session.setter
    def session(self, value: S | None) -> None:
        self._slot(DEFAULT_SESSION).set(value)

    async def get_session(self, name: str = DEFAULT_SESSION) -> Any:
        """Load (and lock) a session now if it is lazy; return it."""
        slot = self._slot(name)
        await slot.load()
        return slot.get()

    def fragment(self, name: str) -> Any:
        """A named session of a bot with several (see `Bot(sessions=...)`)."""
        return self._slot(name).get()

    def set_fragment(self, name: str, value: Any) -> None:
        """Replace a named session; None deletes it (as `ctx.session = None` does for the default one)."""
        self._slot(name).set(value)

    def call(self, method: str, **params: Any) -> None:
        """Queue a Bot API call. It is sent after the update's transaction commits, never before."""
        self.calls.append(OutgoingCall(method, params))

    def reply(self, text: str, **params: Any) -> None:
        """Queue a message to the chat (and forum topic) this update came from."""
        message = self.message
        if message is None:
            raise ValueError("reply(): this update has no message to reply to")
        if message.is_topic_message and message.message_thread_id is not None:
            params.setdefault("message_thread_id", message.message_thread_id)
        self.call("sendMessage", chat_id=message.chat.id, text=text, **params)
