"""Talking to a bot through its webhook as one chat does, and reading its answers from the fake Bot API."""

from __future__ import annotations

from typing import Any

import httpx

from ..types import Update
from .fake_telegram import FakeTelegram
from .updates import message_update
from .webhook_client import WebhookClient

__all__ = ["Chat"]


class Chat(WebhookClient):
    """A `WebhookClient` that speaks as one person in one chat: `chat` and `sender` are who speaks unless
    a call says otherwise, and update ids are handed out in turn."""

    def __init__(self, client: httpx.AsyncClient, fake: FakeTelegram, *, chat: int, sender: int) -> None:
        super().__init__(client, fake)
        self.chat, self.sender = chat, sender
        self.next_id = 1

    def id(self) -> int:
        """A fresh update id."""
        self.next_id += 1
        return self.next_id

    def message(self, text: str, sender: int | None = None, chat: int | None = None) -> Update:
        """A new message update (a fresh id) from `sender` in `chat`."""
        return message_update(
            self.id(), self.chat if chat is None else chat, text, from_id=sender or self.sender
        )

    async def say(self, text: str, sender: int | None = None, chat: int | None = None) -> str:
        """Send a message and return the bot's reply to it."""
        chat = self.chat if chat is None else chat
        before = len(self.fake.sent_messages(chat))
        await self.send(self.message(text, sender, chat))
        return (await self.replies(chat, before + 1))[-1]

    def said(self, chat: int | None = None) -> list[str]:
        """Every message the bot sent to the chat so far, in order."""
        return [str(m["text"]) for m in self.fake.sent_messages(self.chat if chat is None else chat)]

    async def call_params(self, method: str, count: int) -> list[dict[str, Any]]:
        """The parameters of the calls of `method`, once at least `count` arrived."""
        return [call.params for call in await self.calls(method, count)]
