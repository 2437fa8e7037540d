"""`python -m bot chat`: the playground from a terminal. Lines typed at the prompt go to a running local
bot as updates (through its playground API, so through its `POST /webhook`), and its replies are
printed as they arrive: the text as Telegram shows it (formatting read, never shown as markup), a photo's
address, edits, and the buttons of an inline keyboard, numbered: `!2` presses the second (a callback
query, through the webhook too). A reply keyboard's buttons are printed; typing one sends it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
from typing import Any, TextIO

import httpx

from ..errors import BotError
from .chats import PEOPLE

__all__ = ["ChatError", "chat"]


class ChatError(BotError):
    """Why the chat could not start, in one line."""


class _Session:
    def __init__(self, client: httpx.AsyncClient, out: TextIO) -> None:
        self.client = client
        self.out = out
        self.epoch = ""
        self.after = 0
        self.answers = 0  # the bot's calls to this chat seen so far
        self.buttons: list[tuple[int, str]] = []  # the inline buttons shown last: (message id, data)
        self.shown = asyncio.Event()  # set each time events were shown

    async def post(self, name: str, body: dict[str, Any]) -> Any:
        response = await self.client.post(f"/playground/api/{name}", json=body)
        if response.status_code != 200:
            raise ChatError(f"{name}: {response.status_code} {response.text.strip()}")
        return response.json()

    async def events(self, hold: float) -> list[dict[str, Any]]:
        params = {"after": str(self.after), "hold": str(hold), "epoch": self.epoch}
        answer = (await self.client.get("/playground/api/events", params=params)).json()
        self.epoch = answer["epoch"]
        events: list[dict[str, Any]] = answer["events"]
        if events:
            self.after = events[-1]["seq"]
        return events

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def show(self, chat_id: int, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event["kind"]
            if kind in ("reply", "edit") and event["chat_id"] == chat_id:
                self.answers += 1
                edited = f"bot edited message {event['message_id']}" if kind == "edit" else "bot"
                if event.get("photo"):
                    self.say(f"bot sent a photo: {event['photo']}")
                if event.get("text") is not None:
                    self.say(f"{edited}: {event['text']}")
                elif kind == "edit":
                    self.say(f"{edited}'s buttons")
                self.keyboard(event["message_id"], event.get("keyboard"))
            elif kind == "keyboard" and event["chat_id"] == chat_id:
                rows = event["markup"].get("keyboard")
                shown = " ".join(
                    f"[{b if isinstance(b, str) else b['text']}]" for row in rows or [] for b in row
                )
                self.say(f"keyboard: {shown} (type one)" if rows else "(keyboard removed)")
            elif kind == "answer":
                self.answers += 1
                if event.get("text"):
                    self.say(f"({'alert' if event['show_alert'] else 'notice'}: {event['text']})")
            elif kind == "call" and str(event["params"].get("chat_id")) == str(chat_id):
                self.answers += 1
                self.say(f"bot called {event['method']} {event['params']}")
            elif kind == "delivery" and event["status"] != 200:
                self.say(f"(update {event['update_id']}: HTTP {event['status']})")
        self.shown.set()

    def keyboard(self, message_id: int, rows: list[list[dict[str, Any]]] | None) -> None:
        """Number an inline keyboard's buttons: `!N` presses button N."""
        if not rows:
            return
        shown = []
        for row in rows:
            for button in row:
                if isinstance(button.get("callback_data"), str):
                    self.buttons.append((message_id, button["callback_data"]))
                    shown.append(f"[!{len(self.buttons)} {button['text']}]")
                elif button.get("url"):
                    shown.append(f"[{button['text']}: {button['url']}]")
        self.say("  " + " ".join(shown))

    async def caught_up(self, expected: int | None, within: float = 10.0) -> None:
        """Wait (a while at most) until the calls the lines so far queued have been shown."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while expected is not None and self.answers < expected:
                    self.shown.clear()
                    await self.shown.wait()

    async def follow(self, chat_id: int) -> None:
        while True:
            self.show(chat_id, await self.events(hold=2))


async def _open(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        response = await client.get("/playground/api/info")
    except httpx.HTTPError as exc:
        raise ChatError(f"no bot answers at {url} ({exc}); start one with `python -m bot serve`") from exc
    if response.status_code == 404:
        raise ChatError(f"{url}: {response.text.strip()}")
    info: dict[str, Any] = response.json()
    return info


async def chat(
    url: str, chat_type: str, *, title: str, sender: str, chat_id: int | None, stdin: TextIO, out: TextIO
) -> None:
    person = next((p for p in PEOPLE if p.first_name.lower() == sender.lower()), None)
    if person is None:
        raise ChatError(f"--as: one of {', '.join(p.first_name for p in PEOPLE)}")
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await _open(client, url)
        session = _Session(client, out)
        await session.events(hold=0)  # from here on: what happened before is not this chat's
        if chat_id is None:
            made = await session.post("chats", {"type": chat_type, "title": title, "sender": person.id})
            room = made["chat"]
        else:
            name = person.first_name if chat_type == "private" else title
            room = {"id": chat_id, "type": chat_type, "title": name}
        print(
            f"{room['type']} {room['title']!r} (id {room['id']}), typing as {person.first_name}."
            f" Ctrl-D leaves; come back with --chat-type {room['type']} --chat-id {room['id']}",
            file=out,
            flush=True,
        )
        follower = asyncio.create_task(session.follow(room["id"]))
        expected: int | None = 0
        try:
            while True:
                if stdin.isatty():
                    print("> ", end="", file=out, flush=True)
                line = await asyncio.to_thread(stdin.readline)
                if not line:
                    break
                text = line.strip()
                pressed = re.fullmatch(r"!(\d+)", text)
                if pressed is not None:
                    await session.caught_up(expected)  # the buttons of what was sent so far, shown
                if pressed is not None and 1 <= int(pressed.group(1)) <= len(session.buttons):
                    message_id, data = session.buttons[int(pressed.group(1)) - 1]
                    body = {"chat": room, "message_id": message_id, "data": data, "sender": person.id}
                    sent = await session.post("press", body)
                elif text:
                    sent = await session.post("send", {"chat": room, "text": text, "sender": person.id})
                else:
                    continue
                expected = None if expected is None or sent["replies"] is None else expected + sent["replies"]
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        await _last_replies(session, room["id"], expected)


async def _last_replies(session: _Session, chat_id: int, expected: int | None) -> None:
    """After the last line: print the replies still on their way. Each line was committed before its
    send returned, with its replies queued; the outbox may hold them back a while (rate limits)."""
    if expected is None:  # the bot's storage can't say how many: wait for a quiet second
        while events := await session.events(hold=1):
            session.show(chat_id, events)
        return
    try:
        async with asyncio.timeout(60):
            while session.answers < expected:
                session.show(chat_id, await session.events(hold=2))
    except TimeoutError:
        print(f"({expected - session.answers} more still queued in the bot)", file=session.out, flush=True)


def run(args: argparse.Namespace, default_url: str) -> None:
    """The command line's entry: a one-line ChatError for the caller to print, Ctrl-C ends quietly."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            chat(
                args.url or default_url,
                args.chat_type,
                title=args.title,
                sender=args.sender,
                chat_id=args.chat_id,
                stdin=sys.stdin,
                out=sys.stdout,
            )
        )
