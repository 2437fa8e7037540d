"""Inline mode through the webhook, against the fake Bot API and PostgreSQL: an inline query reaches its
handler with a per-user session, and its answer (answerInlineQuery) is sent after the commit, once, even
when Telegram delivers the query again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from bot.app import SECRET_HEADER
from bot.context import Context
from bot.dispatch import Bot
from bot.session import session, user_key
from bot.testing.env import SECRET, make_settings
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.updates import encode, user
from bot.types import InlineQueryResultArticle, InputTextMessageContent

pytestmark = pytest.mark.anyio

OpenClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@dataclass
class Searches:
    count: int = 0


def inline_bot() -> Bot[Searches]:
    bot = Bot(session(initial=Searches, get_session_key=user_key))

    @bot.inline_query()
    async def answer(ctx: Context[Searches]) -> None:
        query = ctx.inline_query
        assert query is not None
        ctx.session.count += 1
        ctx.outbox.answer_inline_query(
            inline_query_id=query.id,
            results=[
                InlineQueryResultArticle(
                    id="echo",
                    title=f"Say {query.query!r}",
                    description=f"search #{ctx.session.count} of {query.from_user.first_name}",
                    input_message_content=InputTextMessageContent(message_text=query.query),
                )
            ],
            cache_time=0,
            is_personal=True,
        )

    return bot


def inline_query(update_id: int, from_id: int, query: str) -> dict[str, Any]:
    return {
        "update_id": update_id,
        "inline_query": {
            "id": f"q{update_id}",
            "from": user(from_id, "Bea"),
            "query": query,
            "offset": "",
            "chat_type": "sender",
        },
    }


async def post(client: httpx.AsyncClient, update: dict[str, Any]) -> int:
    headers = {"content-type": "application/json", SECRET_HEADER: SECRET}
    return (await client.post("/webhook", content=encode(update), headers=headers)).status_code


async def test_an_inline_query_is_answered_once_after_the_commit_with_its_user_s_session(
    open_client: OpenClient, database_url: str, telegram_root: str, fake: FakeTelegram
) -> None:
    async with open_client(make_settings(database_url, telegram_root), inline_bot()) as client:
        assert await post(client, inline_query(1, 42, "pizza")) == 200
        assert await post(client, inline_query(1, 42, "pizza")) == 200  # Telegram delivers it again
        assert await post(client, inline_query(2, 42, "more pizza")) == 200
        await fake.wait_for_async(lambda: len(fake.calls("answerInlineQuery")) >= 2)
        await asyncio.sleep(0.2)  # room for a third answer, which must not come
    # Two answers, sent concurrently (no chat orders them), each once.
    answers = sorted(
        (call.params for call in fake.calls("answerInlineQuery")), key=lambda p: p["inline_query_id"]
    )
    assert answers == [
        {
            "inline_query_id": "q1",
            "results": [
                {
                    "type": "article",
                    "id": "echo",
                    "title": "Say 'pizza'",
                    "input_message_content": {"message_text": "pizza"},
                    "description": "search #1 of Bea",
                }
            ],
            "cache_time": 0,
            "is_personal": True,
        },
        {
            "inline_query_id": "q2",
            "results": [
                {
                    "type": "article",
                    "id": "echo",
                    "title": "Say 'more pizza'",
                    "input_message_content": {"message_text": "more pizza"},
                    "description": "search #2 of Bea",
                }
            ],
            "cache_time": 0,
            "is_personal": True,
        },
    ]


def test_an_inline_bot_asks_telegram_for_inline_queries() -> None:
    assert inline_bot().allowed_updates() == ["inline_query"]
