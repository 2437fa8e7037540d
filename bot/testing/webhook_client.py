"""A bot's webhook in a test: its whole app in process (lifespan, secret check, pipeline, outbox), its
Bot API calls going to the fake Bot API. Post an update, get the webhook's answer; read what the bot
sent from the fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from ..app import create_app
from ..config import Settings
from ..dispatch import Bot
from ..storage import Storage
from ..types import Update
from ..webhook import SECRET_HEADER
from .env import SECRET
from .fake_telegram import FakeTelegram, RecordedCall
from .updates import encode

__all__ = ["WebhookClient", "asgi_client"]


@asynccontextmanager
async def asgi_client(
    settings: Settings, bot: Bot[Any] | None = None, storage: Storage | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process, lifespan and all, behind an httpx client (no bot: the one the APP setting
    names; no storage: PostgreSQL at DATABASE_URL)."""
    app = create_app(settings, bot=bot, storage=storage)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bot") as client,
    ):
        yield client


class WebhookClient:
    """`await hook.post(update)` delivers an update as Telegram does (with the webhook secret) and
    returns the HTTP answer; `await hook.calls("sendPhoto")` waits for the bot's calls to arrive (they
    are sent after the commit, so after the answer)."""

    def __init__(self, http: httpx.AsyncClient, fake: FakeTelegram, secret: str = SECRET) -> None:
        self.http = http
        self.fake = fake
        self.secret = secret

    async def post(self, update: Update | dict[str, Any], *, secret: str | None = None) -> httpx.Response:
        headers = {
            "content-type": "application/json",
            SECRET_HEADER: self.secret if secret is None else secret,
        }
        return await self.http.post("/webhook", content=encode(update), headers=headers)

    async def send(self, update: Update | dict[str, Any]) -> None:
        """Deliver one update; the webhook must take it (200)."""
        response = await self.post(update)
        assert response.status_code == 200, f"the webhook answered {response.status_code}: {response.text}"

    async def calls(self, method: str, count: int = 1, *, timeout: float = 10.0) -> list[RecordedCall]:  # noqa: ASYNC109
        """The calls of `method` the bot made, once there are at least `count`."""
        await self.fake.wait_for_async(lambda: len(self.fake.calls(method)) >= count, timeout)
        return self.fake.calls(method)

    async def replies(self, chat_id: int, count: int = 1, *, timeout: float = 10.0) -> list[str]:  # noqa: ASYNC109
        """The texts of the messages the bot sent to a chat, once there are at least `count`."""
        await self.fake.wait_for_async(lambda: len(self.fake.sent_messages(chat_id)) >= count, timeout)
        return [str(params["text"]) for params in self.fake.sent_messages(chat_id)]
