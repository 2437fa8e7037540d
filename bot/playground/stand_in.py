"""The Bot API as the playground answers it, inside the process: the outbox's calls end here.

The bot's replies go through the production path (handler → outbox row → commit → `BotApi.call` over
HTTP, marked sent on Telegram's answer); only the far end is local. In the trial every call comes here;
a bot with a token and PLAYGROUND=1 sends here only calls addressed to playground chats (see
`bot_api_transport`), and everything else to Telegram as usual.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .chats import is_playground_id
from .events import EventLog

__all__ = ["bot_api_transport", "stand_in_app"]


def _error(code: int, description: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error_code": code, "description": description}, status_code=code)


def stand_in_app(events: EventLog) -> Starlette:
    message_ids = itertools.count(1)

    async def endpoint(request: Request) -> JSONResponse:
        method = request.path_params["method"]
        try:
            params: Any = json.loads(await request.body() or b"{}")
        except ValueError:
            params = None
        if not isinstance(params, dict):
            return _error(400, "Bad Request: can't parse JSON")
        if method != "sendMessage":
            # Shown in the conversation as it is: the playground draws only text messages.
            events.publish("call", method=method, params=params)
            return JSONResponse({"ok": True, "result": True})
        chat_id, text = params.get("chat_id"), params.get("text")
        if not isinstance(chat_id, int):
            return _error(400, "Bad Request: chat_id is required")
        if not text:
            return _error(400, "Bad Request: message text is empty")
        message = {
            "message_id": next(message_ids),
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},  # a valid Chat
            "text": text,
        }
        if isinstance(params.get("message_thread_id"), int):
            message["message_thread_id"] = params["message_thread_id"]
        events.publish("reply", chat_id=chat_id, thread_id=message.get("message_thread_id"), text=text)
        return JSONResponse({"ok": True, "result": message})

    return Starlette(routes=[Route("/bot{token}/{method}", endpoint, methods=["POST"])])


class _ByChat(httpx.AsyncBaseTransport):
    """Calls addressed to a playground chat go to the stand-in, all others to Telegram."""

    def __init__(self, stand_in: httpx.AsyncBaseTransport, telegram: httpx.AsyncBaseTransport) -> None:
        self._stand_in = stand_in
        self._telegram = telegram

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            chat_id = json.loads(request.content or b"{}").get("chat_id")
        except (ValueError, AttributeError):
            chat_id = None
        local = isinstance(chat_id, int) and is_playground_id(chat_id)
        return await (self._stand_in if local else self._telegram).handle_async_request(request)

    async def aclose(self) -> None:
        await self._telegram.aclose()


def bot_api_transport(events: EventLog, *, with_telegram: bool) -> httpx.AsyncBaseTransport:
    """The runtime's Bot API transport: all to the stand-in, or (with a token) only playground chats."""
    stand_in = httpx.ASGITransport(app=stand_in_app(events))
    if not with_telegram:
        return stand_in
    return _ByChat(stand_in, httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=100)))
