"""The Bot API as the playground answers it, inside the process: the outbox's calls end here.

The bot's replies go through the production path (handler → outbox row → commit → `BotApi.call` over
HTTP, marked sent on Telegram's answer); only the far end is local. In the trial every call comes here;
a bot with a token and PLAYGROUND=1 sends here only calls addressed to playground chats (see
`bot_api_transport`), and everything else to Telegram as usual.

What a chat shows is published to the event log: a message with its text and entities (formatting read
as Telegram reads it, `formatting.py`), its inline keyboard and its photo; an edit replacing a message's
text or keyboard; a reply keyboard; a pressed button's answer. Sent photos are kept (the last
`KEEP_FILES`) for the page to show. Other methods are shown as calls, and answered with a result of
their type.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import OrderedDict
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import BotError
from ..files import Upload
from ..forms import BadForm, parse_body, read_params
from ..testing.results import RESULT_TYPES, minimal
from .chats import is_playground_id
from .events import EventLog
from .formatting import BadMarkup, entities_of

__all__ = ["Shown", "bot_api_transport", "stand_in_app"]

KEEP_MESSAGES = 2000  # the bot's messages remembered, for a press on one of their buttons
KEEP_FILES = 100
_IMAGES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))


class _Refused(BotError):
    def __init__(self, description: str) -> None:
        self.description = description


class Shown:
    """The bot's messages as the playground shows them, and the photos it sent."""

    def __init__(self) -> None:
        self.messages: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()
        self._files: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._ids = itertools.count(1)

    def message(self, chat_id: int, message_id: int) -> dict[str, Any] | None:
        """A message the bot sent, as Telegram would put it in a callback query."""
        return self.messages.get((chat_id, message_id))

    def keep(self, message: dict[str, Any]) -> None:
        self.messages[(message["chat"]["id"], message["message_id"])] = message
        while len(self.messages) > KEEP_MESSAGES:
            self.messages.popitem(last=False)

    def keep_file(self, upload: Upload) -> str:
        """A sent file's id (its address on the page: /playground/files/<id>)."""
        file_id = f"pg{next(self._ids)}"
        self._files[file_id] = (_media_type(upload.data), upload.data)
        while len(self._files) > KEEP_FILES:
            self._files.popitem(last=False)
        return file_id

    def file(self, file_id: str) -> tuple[str, bytes] | None:
        return self._files.get(file_id)

    def photo_address(self, reference: str, files: dict[str, Upload]) -> tuple[str, str | None]:
        """(file_id, the address the page loads it from: None for a file_id it never saw)."""
        upload = files.get(reference.removeprefix("attach://")) if reference.startswith("attach://") else None
        if upload is not None:
            file_id = self.keep_file(upload)
            return file_id, f"/playground/files/{file_id}"
        if reference.startswith(("https://", "http://")):
            return reference, reference
        return reference, f"/playground/files/{reference}" if reference in self._files else None


def _media_type(data: bytes) -> str:
    """An image type by the file's first bytes; anything else is served as a download, never as a page."""
    return next((kind for magic, kind in _IMAGES if data.startswith(magic)), "application/octet-stream")


def file_response(shown: Shown, file_id: str) -> Response:
    found = shown.file(file_id)
    if found is None:
        return Response("no such file", status_code=404)
    media_type, data = found
    headers = {"x-content-type-options": "nosniff", "content-security-policy": "sandbox"}
    if media_type == "application/octet-stream":
        headers["content-disposition"] = "attachment"
    return Response(data, media_type=media_type, headers=headers)


def _error(code: int, description: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error_code": code, "description": description}, status_code=code)


def _json(value: Any) -> Any:
    """A parameter as sent: a multipart field holds an object as JSON text."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _chat_id(params: dict[str, Any]) -> int:
    try:
        return int(params["chat_id"])
    except (KeyError, TypeError, ValueError):
        raise _Refused("Bad Request: chat_id is required") from None


def _formatted(params: dict[str, Any], field: str) -> tuple[str, list[dict[str, Any]]]:
    text = str(params.get(field) or "")
    given = _json(params.get("entities" if field == "text" else "caption_entities"))
    if isinstance(given, list):
        return text, given
    try:
        return entities_of(text, params.get("parse_mode"))
    except BadMarkup as exc:
        raise _Refused(f"Bad Request: {exc}") from None


class _StandIn:
    def __init__(self, events: EventLog, shown: Shown) -> None:
        self.events = events
        self.shown = shown
        self.message_ids = itertools.count(1)

    async def endpoint(self, request: Request) -> JSONResponse:
        method = request.path_params["method"]
        try:
            params, files = await read_params(request)
        except BadForm as exc:
            return _error(400, f"Bad Request: {exc}")
        handler = getattr(self, f"_m_{method}", None)
        try:
            if handler is not None:
                return JSONResponse({"ok": True, "result": handler(params, files)})
        except _Refused as exc:
            return _error(400, exc.description)
        if method not in RESULT_TYPES:
            return _error(404, "Not Found: method not found")
        # Shown in the conversation as it is, and answered with a valid result of its type.
        shown_params = {k: _json(v) for k, v in params.items()}
        self.events.publish("call", method=method, params=shown_params)
        return JSONResponse({"ok": True, "result": minimal(RESULT_TYPES[method])})

    def _send(self, params: dict[str, Any], field: str, **extra: Any) -> dict[str, Any]:
        chat_id = _chat_id(params)
        text, entities = _formatted(params, field)
        if field == "text" and not text:
            raise _Refused("Bad Request: message text is empty")
        message: dict[str, Any] = {
            "message_id": next(self.message_ids),
            "date": int(time.time()),  # 0 would make it an inaccessible message
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},  # a valid Chat
            **({field: text} if text else {}),
            **({"entities" if field == "text" else "caption_entities": entities} if entities else {}),
            **extra,
        }
        thread_id = params.get("message_thread_id")
        if thread_id is not None:
            message["message_thread_id"] = int(thread_id)
        markup = _json(params.get("reply_markup"))
        inline = markup.get("inline_keyboard") if isinstance(markup, dict) else None
        if inline is not None:
            message["reply_markup"] = {"inline_keyboard": inline}
        self.shown.keep(message)
        self.events.publish(
            "reply",
            chat_id=chat_id,
            thread_id=message.get("message_thread_id"),
            message_id=message["message_id"],
            text=text,
            entities=entities,
            keyboard=inline,
            photo=extra.get("photo_address"),
        )
        if isinstance(markup, dict) and inline is None:
            # A reply keyboard, its removal, or a forced reply: what the chat's composer offers now.
            self.events.publish("keyboard", chat_id=chat_id, markup=markup)
        message.pop("photo_address", None)
        return message

    def _m_sendMessage(self, params: dict[str, Any], files: dict[str, Upload]) -> dict[str, Any]:
        return self._send(params, "text")

    def _m_sendPhoto(self, params: dict[str, Any], files: dict[str, Upload]) -> dict[str, Any]:
        file_id, address = self.shown.photo_address(str(params.get("photo", "")), files)
        photo = [{"file_id": file_id, "file_unique_id": file_id, "width": 1, "height": 1}]
        return self._send(params, "caption", photo=photo, photo_address=address)

    def _edit(self, params: dict[str, Any], field: str | None) -> dict[str, Any] | bool:
        if params.get("inline_message_id"):
            return True
        chat_id = _chat_id(params)
        message = self.shown.message(chat_id, int(params.get("message_id") or 0))
        if message is None:
            raise _Refused("Bad Request: message to edit not found")
        change: dict[str, Any] = {"chat_id": chat_id, "message_id": message["message_id"]}
        if field is not None:
            text, entities = _formatted(params, field)
            message[field] = text
            message["entities" if field == "text" else "caption_entities"] = entities
            change.update(text=text, entities=entities)
        markup = _json(params.get("reply_markup"))
        keyboard = markup.get("inline_keyboard") if isinstance(markup, dict) else None
        message["reply_markup"] = {"inline_keyboard": keyboard} if keyboard else None
        message["edit_date"] = 1
        self.events.publish("edit", keyboard=keyboard, **change)
        return {k: v for k, v in message.items() if v is not None}

    def _m_editMessageText(self, params: dict[str, Any], files: dict[str, Upload]) -> dict[str, Any] | bool:
        return self._edit(params, "text")

    def _m_editMessageCaption(
        self, params: dict[str, Any], files: dict[str, Upload]
    ) -> dict[str, Any] | bool:
        return self._edit(params, "caption")

    def _m_editMessageReplyMarkup(
        self, params: dict[str, Any], files: dict[str, Upload]
    ) -> dict[str, Any] | bool:
        return self._edit(params, None)

    def _m_answerCallbackQuery(self, params: dict[str, Any], files: dict[str, Upload]) -> bool:
        self.events.publish(
            "answer",
            callback_query_id=params.get("callback_query_id"),
            text=params.get("text"),
            show_alert=_json(params.get("show_alert")) in (True, "true"),
        )
        return True


def stand_in_app(events: EventLog, shown: Shown) -> Starlette:
    stand_in = _StandIn(events, shown)
    return Starlette(routes=[Route("/bot{token}/{method}", stand_in.endpoint, methods=["POST"])])


class _ByChat(httpx.AsyncBaseTransport):
    """Calls addressed to a playground chat go to the stand-in, all others to Telegram."""

    def __init__(self, stand_in: httpx.AsyncBaseTransport, telegram: httpx.AsyncBaseTransport) -> None:
        self._stand_in = stand_in
        self._telegram = telegram

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            params, _ = parse_body(await request.aread(), request.headers.get("content-type", ""))
            chat_id = int(params.get("chat_id"))  # type: ignore[arg-type]
        except (BadForm, TypeError, ValueError):
            chat_id = None
        local = chat_id is not None and is_playground_id(chat_id)
        return await (self._stand_in if local else self._telegram).handle_async_request(request)

    async def aclose(self) -> None:
        await self._telegram.aclose()


def bot_api_transport(events: EventLog, shown: Shown, *, with_telegram: bool) -> httpx.AsyncBaseTransport:
    """The runtime's Bot API transport: all to the stand-in, or (with a token) only playground chats."""
    stand_in = httpx.ASGITransport(app=stand_in_app(events, shown))
    if not with_telegram:
        return stand_in
    return _ByChat(stand_in, httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=100)))
