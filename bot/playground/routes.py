"""The playground's HTTP side: the page, and the small API behind it.

Nothing underneath is faked: the API builds Telegram-shaped updates and POSTs them, with the webhook
secret, to this same app's `POST /webhook` (in process, through the app's full HTTP handling). A
delivery that is not answered 2xx is delivered again, as Telegram does. The replies come back through
the outbox to the Bot API stand-in (`stand_in.py`), which publishes them to the page.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Annotated, Any

import httpx
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..config import Settings
from ..errors import BotError
from ..runtime import Runtime
from ..storage import StorageUnavailable
from ..storage.postgres import SessionRow
from ..telegram import decode_update
from ..types import Update
from ..webhook import SECRET_HEADER
from .chats import PEOPLE, ChatRef, ChatType, Ids, Person, message_update, telegram_chat
from .events import EventLog
from .stand_in import Shown, bot_api_transport, file_response

__all__ = ["Playground"]

log = logging.getLogger("bot.playground")

PAGE = files("bot.playground") / "static" / "index.html"
DELIVERY_ATTEMPTS = 6  # Telegram keeps trying far longer; six (about 12 s) is enough to show it here
KEEP_UPDATES = 2000  # sent updates remembered for "deliver again"

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class _Send(msgspec.Struct, frozen=True):
    chat: ChatRef
    text: Text
    sender: int = PEOPLE[0].id
    thread_id: Annotated[int, msgspec.Meta(ge=1)] | None = None


class _Burst(msgspec.Struct, frozen=True):
    chat: ChatRef
    text: Text
    sender: int = PEOPLE[0].id
    thread_id: Annotated[int, msgspec.Meta(ge=1)] | None = None
    count: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20


class _NewChat(msgspec.Struct, frozen=True):
    type: ChatType
    title: Annotated[str, msgspec.Meta(max_length=128)] = ""
    forum: bool = False
    sender: int = PEOPLE[0].id


class _Upgrade(msgspec.Struct, frozen=True):
    chat: ChatRef
    sender: int = PEOPLE[0].id


class _Press(msgspec.Struct, frozen=True):
    chat: ChatRef
    message_id: int
    data: Annotated[str, msgspec.Meta(max_length=64)]
    sender: int = PEOPLE[0].id


class _Redeliver(msgspec.Struct, frozen=True):
    update_id: int


class _Peek(msgspec.Struct, frozen=True):
    chat: ChatRef
    sender: int = PEOPLE[0].id


class _BadRequest(BotError):
    pass


def _person(person_id: int) -> Person:
    for person in PEOPLE:
        if person.id == person_id:
            return person
    raise _BadRequest(f"sender: no such person {person_id}")


def _sender(chat: ChatRef, person_id: int) -> Person:
    """Who writes: the chosen person, except in a private chat, where it is always its one user."""
    return _person(chat.id if chat.type == "private" else person_id)


def _row(name: str, key: str, row: SessionRow | None) -> dict[str, Any]:
    if row is None:
        return {"name": name, "key": key, "stored": False}
    return {
        "name": name,
        "key": key,
        "stored": True,
        "data": json.loads(row.data),
        "version": row.version,
        "updated_at": row.updated_at.isoformat(),
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
    }


Endpoint = Callable[[Request], Awaitable[Response]]


def _json_api(handler: Callable[[Request, Runtime], Awaitable[Any]]) -> Endpoint:
    """JSON in and out. A POST must say it is JSON: a cross-site form or `text/plain` fetch (which
    browsers send without asking) is refused, so a web page elsewhere cannot drive a local bot."""

    async def endpoint(request: Request) -> Response:
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if request.method == "POST" and media_type != "application/json":
            return JSONResponse({"error": "content-type must be application/json"}, status_code=415)
        try:
            return JSONResponse(await handler(request, request.app.state.runtime))
        except _BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except StorageUnavailable as exc:
            return JSONResponse({"error": f"the database is not answering: {exc}"}, status_code=503)

    return endpoint


async def _decode(request: Request, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(await request.body(), type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _BadRequest(str(exc)) from None


class Playground:
    """One per app: the event log, the id source, and the updates sent lately (for "deliver again")."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.events = EventLog()
        self._ids = Ids()
        self._ids_checked = False
        self._sent: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.shown = Shown()

    def bot_api_transport(self) -> httpx.AsyncBaseTransport:
        return bot_api_transport(self.events, self.shown, with_telegram=self.settings.bot_token is not None)

    def routes(self) -> list[BaseRoute]:
        reads = {"info": self._info, "events": self._poll}
        writes = {
            "chats": self._new_chat,
            "send": self._send,
            "press": self._press,
            "burst": self._burst,
            "redeliver": self._redeliver,
            "upgrade": self._upgrade,
            "peek": self._peek,
        }
        return [
            Route("/", self._page, methods=["GET"]),
            *(Route(f"/playground/api/{n}", _json_api(h), methods=["GET"]) for n, h in reads.items()),
            *(Route(f"/playground/api/{n}", _json_api(h), methods=["POST"]) for n, h in writes.items()),
            Route("/playground/files/{file_id}", self._file, methods=["GET"]),
            Mount("/playground/static", StaticFiles(packages=[("bot.playground", "static")])),
        ]

    async def _page(self, request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def _file(self, request: Request) -> Response:
        """A photo the bot sent, for the page to show."""
        return file_response(self.shown, request.path_params["file_id"])

    # --- the API ---

    async def _info(self, request: Request, runtime: Runtime) -> Any:
        username = runtime.me.username
        return {
            "username": username,
            "people": [msgspec.to_builtins(p) for p in PEOPLE],
            "quick": [text.replace("{username}", username) for text in runtime.pipeline.bot.examples],
            "epoch": self.events.epoch,
        }

    async def _poll(self, request: Request, runtime: Runtime) -> Any:
        try:
            after = int(request.query_params.get("after", "0"))
            # Short: uvicorn's graceful shutdown waits for a poll being held.
            hold = min(float(request.query_params.get("hold", "2")), 5.0)
        except ValueError:
            raise _BadRequest("after: a whole number; hold: seconds") from None
        if request.query_params.get("epoch", self.events.epoch) != self.events.epoch:
            after = 0  # the server restarted: numbering began again
        return {"epoch": self.events.epoch, "events": await self.events.wait(after, hold)}

    async def _new_chat(self, request: Request, runtime: Runtime) -> Any:
        ask: _NewChat = await _decode(request, _NewChat)
        await self._check_ids(runtime)
        if ask.type == "private":
            person = _person(ask.sender)
            chat = ChatRef(person.id, "private", person.first_name)
        else:
            title = ask.title.strip() or f"Playground {ask.type}"
            chat = ChatRef(-self._ids.next(), ask.type, title, ask.forum and ask.type == "supergroup")
        self.events.publish("chat", chat=msgspec.to_builtins(chat))
        return {"chat": msgspec.to_builtins(chat)}

    async def _send(self, request: Request, runtime: Runtime) -> Any:
        ask: _Send = await _decode(request, _Send)
        await self._check_ids(runtime)
        update = self._new_update(ask.chat, _sender(ask.chat, ask.sender), ask.text, ask.thread_id)
        status = await self._deliver(request.app, update)
        await self._show_sessions(runtime, update)
        return {
            "update_id": update["update_id"],
            "status": status,
            "replies": await _replies(runtime, update),
        }

    async def _press(self, request: Request, runtime: Runtime) -> Any:
        """A press on an inline button of one of the bot's messages: a callback query, through the
        webhook like any update. Only a button the message has can be pressed, as in Telegram."""
        ask: _Press = await _decode(request, _Press)
        await self._check_ids(runtime)
        message = self.shown.message(ask.chat.id, ask.message_id)
        markup = (message or {}).get("reply_markup") or {}
        buttons = [b for row in markup.get("inline_keyboard", []) for b in row]
        if message is None or not any(b.get("callback_data") == ask.data for b in buttons):
            raise _BadRequest(f"message {ask.message_id} has no button with callback data {ask.data!r}")
        sender = _sender(ask.chat, ask.sender)
        update_id = self._ids.next()
        update = {
            "update_id": update_id,
            "callback_query": {
                "id": str(update_id),
                "from": {"id": sender.id, "is_bot": False, "first_name": sender.first_name},
                "chat_instance": str(ask.chat.id),
                "message": {**message, "chat": telegram_chat(ask.chat)},
                "data": ask.data,
            },
        }
        self._remember(update)
        self.events.publish(
            "press",
            update_id=update_id,
            chat_id=ask.chat.id,
            message_id=ask.message_id,
            data=ask.data,
            sender=sender.first_name,
        )
        status = await self._deliver(request.app, update)
        await self._show_sessions(runtime, update)
        return {"update_id": update_id, "status": status, "replies": await _replies(runtime, update)}

    async def _burst(self, request: Request, runtime: Runtime) -> Any:
        """`count` updates at once, as Telegram sends a busy chat's backlog over parallel connections."""
        ask: _Burst = await _decode(request, _Burst)
        await self._check_ids(runtime)
        sender = _sender(ask.chat, ask.sender)
        updates = [self._new_update(ask.chat, sender, ask.text, ask.thread_id) for _ in range(ask.count)]
        statuses = await asyncio.gather(*(self._deliver(request.app, u) for u in updates))
        await self._show_sessions(runtime, updates[-1])
        return {"update_ids": [u["update_id"] for u in updates], "statuses": statuses}

    async def _redeliver(self, request: Request, runtime: Runtime) -> Any:
        ask: _Redeliver = await _decode(request, _Redeliver)
        update = self._sent.get(ask.update_id)
        if update is None:
            raise _BadRequest(
                f"update {ask.update_id} is not among the {KEEP_UPDATES} sent last by this process"
            )
        self.events.publish("redelivery", update_id=ask.update_id, chat_id=_chat_of(update))
        status = await self._deliver(request.app, update)
        await self._show_sessions(runtime, update)
        return {"update_id": ask.update_id, "status": status}

    async def _upgrade(self, request: Request, runtime: Runtime) -> Any:
        """What Telegram does when a group becomes a supergroup: a new chat id, and a service message in
        each chat naming the other (the old chat's last, the new chat's first)."""
        ask: _Upgrade = await _decode(request, _Upgrade)
        await self._check_ids(runtime)
        if ask.chat.type != "group":
            raise _BadRequest("only a group can be upgraded to a supergroup")
        sender = _person(ask.sender)
        new = ChatRef(-self._ids.next(), "supergroup", ask.chat.title)
        self.events.publish("chat", chat=msgspec.to_builtins(new), upgraded_from=ask.chat.id)
        last = self._new_update(ask.chat, sender, None, None, migrate_to_chat_id=new.id)
        first = self._new_update(new, sender, None, None, migrate_from_chat_id=ask.chat.id)
        statuses = [await self._deliver(request.app, last), await self._deliver(request.app, first)]
        await self._show_sessions(runtime, last)
        await self._show_sessions(runtime, first)
        return {"chat": msgspec.to_builtins(new), "statuses": statuses}

    async def _peek(self, request: Request, runtime: Runtime) -> Any:
        ask: _Peek = await _decode(request, _Peek)
        return {"rows": await self._rows(runtime, self._example(ask.chat, _sender(ask.chat, ask.sender)))}

    # --- underneath ---

    async def _check_ids(self, runtime: Runtime) -> None:
        """Once per process, before the first id is made: continue above the ids already recorded."""
        latest = getattr(runtime.storage, "latest_update_id", None)
        if not self._ids_checked and latest is not None:
            used = await latest(runtime.me.id)
            if used is not None:
                self._ids.seen(used)
        self._ids_checked = True

    def _new_update(
        self, chat: ChatRef, sender: Person, text: str | None, thread_id: int | None, **service: Any
    ) -> dict[str, Any]:
        thread_id = thread_id if chat.is_forum else None
        update = message_update(self._ids.next(), chat, sender, text=text, thread_id=thread_id, **service)
        self._remember(update)
        message = update.get("message") or update["channel_post"]
        self.events.publish(
            "update",
            update_id=update["update_id"],
            chat_id=chat.id,
            thread_id=thread_id,
            sender=None if chat.type == "channel" else sender.first_name,
            text=text,
            service=dict(service) or None,
            date=message["date"],
        )
        return update

    def _remember(self, update: dict[str, Any]) -> None:
        """Kept for "deliver again"."""
        self._sent[update["update_id"]] = update
        while len(self._sent) > KEEP_UPDATES:
            self._sent.popitem(last=False)

    async def _deliver(self, app: Starlette, update: dict[str, Any]) -> int:
        """POST the update to our own /webhook until it is answered 2xx, as Telegram would (a 4xx is
        final: the same body would be refused again). Returns the last status."""
        body = json.dumps(update, ensure_ascii=False).encode()
        headers = {SECRET_HEADER: self.settings.webhook_secret, "content-type": "application/json"}
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        status = 0
        async with httpx.AsyncClient(transport=transport, base_url="http://playground") as client:
            for attempt in range(1, DELIVERY_ATTEMPTS + 1):
                status = (await client.post("/webhook", content=body, headers=headers)).status_code
                self.events.publish("delivery", update_id=update["update_id"], status=status, attempt=attempt)
                if status < 500 and status != 429:
                    break
                await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
        if not 200 <= status < 300:
            log.warning("playground: update %d answered %d", update["update_id"], status)
        return status

    def _example(self, chat: ChatRef, sender: Person) -> dict[str, Any]:
        """An update of this chat, never sent: what the session keys of the chat's messages are."""
        return message_update(0, chat, sender, text="")

    async def _rows(self, runtime: Runtime, update: dict[str, Any]) -> list[dict[str, Any]]:
        """Each session of the bot that this update would use, as stored now."""
        peek = getattr(runtime.storage, "peek", None)
        decoded: Update = decode_update(json.dumps(update).encode())
        rows = []
        for name, config in runtime.pipeline.bot.sessions.items():
            key = config.key(decoded)
            if key is not None and peek is not None:
                rows.append(_row(name, key, await peek(key)))
        return rows

    async def _show_sessions(self, runtime: Runtime, update: dict[str, Any]) -> None:
        try:
            rows = await self._rows(runtime, update)
        except StorageUnavailable as exc:
            log.warning("playground: could not read the sessions: %s", exc)
            return
        self.events.publish("session", chat_id=_chat_of(update), rows=rows)


async def _replies(runtime: Runtime, update: dict[str, Any]) -> int | None:
    """How many calls the update queued (None: this storage can't say), so a client knows what to wait for."""
    count = getattr(runtime.storage, "queued_calls", None)
    return None if count is None else int(await count(runtime.me.id, update["update_id"]))


def _chat_of(update: dict[str, Any]) -> int:
    message = update.get("message") or update.get("channel_post") or update["callback_query"]["message"]
    chat_id: int = message["chat"]["id"]
    return chat_id
