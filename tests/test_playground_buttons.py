"""The playground shows what a button bot sends: inline keyboards whose presses are callback queries
through the webhook, edits replacing the shown message, reply keyboards, formatted text (read as
Telegram reads parse_mode, never as the page's HTML) and photos."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from test_playground import Page

from bot.config import load_settings
from bot.context import Context
from bot.dispatch import Bot
from bot.filters import data_startswith
from bot.keyboards import button, inline_keyboard, reply_keyboard, url_button
from bot.playground.chats import BASE
from bot.playground.formatting import BadMarkup, entities_of
from bot.playground.stand_in import _ByChat
from bot.session import session
from bot.types import InputFile

pytestmark = pytest.mark.anyio

OpenClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


# --- formatting, as Telegram reads it -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode", "plain", "entities"),
    [
        ("<b>hi</b> <i>you</i>", "HTML", "hi you", [("bold", 0, 2), ("italic", 3, 3)]),
        ("&lt;script&gt;alert(1)&lt;/script&gt;", "HTML", "<script>alert(1)</script>", []),
        ('<a href="https://t.me">link</a>', "HTML", "link", [("text_link", 0, 4)]),
        ("<b>🍕 <u>x</u></b>", "HTML", "🍕 x", [("bold", 0, 4), ("underline", 3, 1)]),  # UTF-16: 🍕 is 2
        (
            "*bold* _it_ __u__ ~s~ ||sp|| `c`",
            "MarkdownV2",
            "bold it u s sp c",
            [
                ("bold", 0, 4),
                ("italic", 5, 2),
                ("underline", 8, 1),
                ("strikethrough", 10, 1),
                ("spoiler", 12, 2),
                ("code", 15, 1),
            ],
        ),
        ("1\\.5 \\*not bold\\*", "MarkdownV2", "1.5 *not bold*", []),
        ("[site](https://example.com)", "MarkdownV2", "site", [("text_link", 0, 4)]),
        ("*bold* 1.5 _x_", "Markdown", "bold 1.5 x", [("bold", 0, 4), ("italic", 9, 1)]),
        ("<b>not parsed</b>", None, "<b>not parsed</b>", []),
    ],
)
def test_parse_modes_become_text_and_entities(
    text: str, mode: str | None, plain: str, entities: list[tuple[str, int, int]]
) -> None:
    got_plain, got = entities_of(text, mode)
    assert got_plain == plain
    assert [(e["type"], e["offset"], e["length"]) for e in got] == entities


@pytest.mark.parametrize(
    ("text", "mode", "complaint"),
    [
        ("<script>alert(1)</script>", "HTML", 'unsupported start tag "script"'),
        ('<img src=x onerror="alert(1)">', "HTML", 'unsupported start tag "img"'),
        ("<b>open", "HTML", "can't find end tag"),
        ("1.5", "MarkdownV2", "character '.' is reserved"),
        ("*open", "MarkdownV2", "can't find end of bold entity"),
    ],
)
def test_markup_telegram_refuses_is_refused_with_its_words(text: str, mode: str, complaint: str) -> None:
    with pytest.raises(BadMarkup, match="can't parse entities") as caught:
        entities_of(text, mode)
    assert complaint in str(caught.value)


# --- through the playground ---------------------------------------------------------------------


@dataclass
class Votes:
    yes: int = 0


def button_bot() -> Bot[Votes]:
    bot = Bot(session(initial=Votes))

    @bot.command("vote")
    async def vote(ctx: Context[Votes]) -> None:
        ctx.reply(
            "<b>Vote</b> &lt;now&gt;",
            parse_mode="HTML",
            reply_markup=inline_keyboard([button("Yes", "yes"), url_button("Rules", "https://example.com")]),
        )

    @bot.callback_query(data_startswith("yes"))
    async def yes(ctx: Context[Votes]) -> None:
        ctx.session.yes += 1
        ctx.answer(f"Counted: {ctx.session.yes}")
        ctx.edit_text(
            f"*Yes*: {ctx.session.yes}",
            parse_mode="MarkdownV2",
            reply_markup=inline_keyboard([button("Yes", "yes")]),
        )

    @bot.command("colour")
    async def colour(ctx: Context[Votes]) -> None:
        ctx.reply("Pick one", reply_markup=reply_keyboard(["Red", "Green"], one_time=True))

    @bot.command("cat")
    async def cat(ctx: Context[Votes]) -> None:
        assert ctx.chat is not None
        ctx.outbox.send_photo(
            chat_id=ctx.chat.id,
            photo=InputFile(PNG, filename="cat.png"),
            caption="a <i>cat</i>",
            parse_mode="HTML",
        )

    @bot.command("evil")
    async def evil(ctx: Context[Votes]) -> None:
        ctx.reply('<img src=x onerror="alert(1)">', parse_mode="HTML")  # Telegram refuses it: so do we
        ctx.reply("after the refused one")

    return bot


@pytest.fixture
async def page(database_url: str, open_client: OpenClient) -> AsyncIterator[Page]:
    async with open_client(load_settings({"DATABASE_URL": database_url}), button_bot()) as client:
        yield Page(client)


def of(kind: str, chat: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["kind"] == kind and e.get("chat_id") == chat["id"]


async def test_a_press_is_a_callback_query_through_the_webhook_and_its_edit_replaces_the_message(
    page: Page,
) -> None:
    chat = await page.chat("group")
    await page.say(chat, "/vote")
    shown = await page.wait_for(of("reply", chat))
    assert shown["text"] == "Vote <now>"
    assert [(e["type"], e["offset"], e["length"]) for e in shown["entities"]] == [("bold", 0, 4)]
    assert shown["keyboard"] == [
        [{"text": "Yes", "callback_data": "yes"}, {"text": "Rules", "url": "https://example.com"}]
    ]
    pressed = await page.post("press", {"chat": chat, "message_id": shown["message_id"], "data": "yes"})
    assert pressed["status"] == 200 and pressed["replies"] == 2  # answerCallbackQuery, editMessageText
    edit = await page.wait_for(of("edit", chat))
    assert (edit["message_id"], edit["text"], edit["keyboard"]) == (
        shown["message_id"],
        "Yes: 1",
        [[{"text": "Yes", "callback_data": "yes"}]],
    )
    assert [e["type"] for e in edit["entities"]] == ["bold"]
    answer = await page.wait_for(lambda e: e["kind"] == "answer")
    assert answer["text"] == "Counted: 1" and answer["show_alert"] is False
    assert await page.stored(chat) == {"yes": 1}
    # Only a button the message has can be pressed, as in Telegram.
    refused = await page.client.post(
        "/playground/api/press", json={"chat": chat, "message_id": shown["message_id"], "data": "no"}
    )
    assert refused.status_code == 400 and "has no button" in refused.json()["error"]


async def test_a_reply_keyboard_is_offered_and_a_photo_is_shown_from_its_upload(page: Page) -> None:
    chat = await page.chat("group")
    await page.say(chat, "/colour")
    keyboard = await page.wait_for(of("keyboard", chat))
    assert keyboard["markup"]["keyboard"] == [[{"text": "Red"}, {"text": "Green"}]]
    await page.say(chat, "/cat")
    photo = await page.wait_for(lambda e: of("reply", chat)(e) and e["photo"] is not None)
    assert (photo["text"], [e["type"] for e in photo["entities"]]) == ("a cat", ["italic"])
    served = await page.client.get(photo["photo"])
    assert served.status_code == 200 and served.content == PNG
    assert (
        served.headers["content-type"] == "image/png"
        and served.headers["x-content-type-options"] == "nosniff"
    )


async def test_markup_telegram_would_refuse_is_refused_and_never_reaches_the_page(page: Page) -> None:
    chat = await page.chat("group")
    await page.say(chat, "/evil")
    after = await page.wait_for(of("reply", chat))
    assert after["text"] == "after the refused one"  # the refused reply was the chat's first: it gave up
    assert not [e for e in page.seen if e["kind"] == "reply" and "img" in e["text"]]


async def test_with_a_token_an_upload_to_a_playground_chat_goes_to_the_stand_in() -> None:
    """PLAYGROUND=1 with a token: calls are routed by their chat_id, read from a multipart body too."""
    seen: list[str] = []

    def answering(name: str) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            seen.append(name)
            return httpx.Response(200, json={"ok": True, "result": True})

        return httpx.MockTransport(handle)

    router = _ByChat(answering("stand-in"), answering("telegram"))
    async with httpx.AsyncClient(transport=router) as http:
        for chat_id in (-(BASE + 5), -100123):
            await http.post(
                "http://telegram/botX/sendPhoto",
                data={"chat_id": str(chat_id)},
                files=[("file0", ("cat.png", PNG, "image/png"))],
            )
    assert seen == ["stand-in", "telegram"]
