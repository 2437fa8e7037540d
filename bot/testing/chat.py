"""Talking to a bot through its webhook as one chat does, and reading its answers from the fake Bot API."""

from __future__ import annotations

from typing import Any

import httpx

from ..app import SECRET_HEADER
from .env import SECRET
from .fake_telegram import FakeTelegram
from .updates import encode, message_update

__all__ = ["Chat"]


class Chat:
    """Sends updates to the bot's /webhook (an in-process app's client) and reads what it sent back,
    one call at a time. `chat` and `sender` are who speaks unless a call says otherwise."""

    def __init__(self, client: httpx.AsyncClient, fake: FakeTelegram, *, chat: int, sender: int) -> None:
        self.client, self.fake = client, fake
        self.chat, self.sender = chat, sender
        self.next_id = 1

    async def send(self, update: dict[str, Any]) -> None:
        """Deliver one update; the webhook must take it (200)."""
        headers = {SECRET_HEADER: SECRET, "content-type": "application/json"}
        response = await self.client.post("/webhook", content=encode(update), headers=headers)
        assert response.status_code == 200, response.text

    def id(self) -> int:
        """A fresh update id."""
        self.next_id += 1
        return self.next_id

    def message(self, text: str, sender: int | None = None, chat: int | None = None) -> dict[str, Any]:
        """A new message update (a fresh id) from `sender` in `chat`."""
        return message_update(
            self.id(), self.chat if chat is None else chat, text, from_id=sender or self.sender
        )

    async def say(self, text: str, sender: int | None = None, chat: int | None = None) -> str:
        """Send a message and return the bot's reply to it."""
        chat = self.chat if chat is None else chat
        before = len(self.fake.sent_messages(chat))
        await self.send(self.message(text, sender, chat))
        await self.fake.wait_for_async(lambda: len(self.fake.sent_messages(chat)) > before)
        return str(self.fake.sent_messages(chat)[-1]["text"])

    def said(self, chat: int | None = None) -> list[str]:
        """Every message the bot sent to the chat so far, in order."""
        return [str(m["text"]) for m in self.fake.sent_messages(self.chat if chat is None else chat)]

    async def calls(self, method: str, count: int) -> list[dict[str, Any]]:
        """The parameters of the first `count` calls of `method`, once that many arrived."""
        await self.fake.wait_for_async(lambda: len(self.fake.calls(method)) >= count)
        return [c.params for c in self.fake.calls(method)]
