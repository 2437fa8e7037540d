"""The three versions of the pizza bot in docs/SESSIONS.md behave alike, on both storages; the Python
blocks of docs/SESSIONS.md and docs/GUIDE.md run, and so does every handler they define."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from bot import methods
from bot.apps.pizza_testing import PIZZA, hunger
from bot.context import BotIdentity, ImmediateApi
from bot.dispatch import Bot
from bot.metrics import Metrics
from bot.pipeline import Pipeline, Status
from bot.storage import Storage
from bot.storage.memory import MemoryStorage
from bot.telegram import BotApi, decode_update
from bot.testing.env import TOKEN
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.updates import (
    callback_update,
    encode,
    inline_query_update,
    message_update,
    successful_payment_update,
    text_update,
)
from bot.types import InputFile

pytestmark = pytest.mark.anyio

EXAMPLES = sorted((Path(__file__).parent.parent / "docs" / "examples").glob("pizza_*.py"))


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


def test_there_are_three_examples() -> None:
    assert [p.stem for p in EXAMPLES] == ["pizza_initial", "pizza_lazy", "pizza_minimal"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
async def test_every_example_counts_pizzas_per_chat(storage: Storage, path: Path) -> None:
    run = Pipeline(load(path).build_bot(), storage, BotIdentity(1, "pizza_bot"), Metrics())
    updates = [
        hunger(1, -1),
        message_update(2, -1, PIZZA),
        message_update(3, -1, f"{PIZZA}{PIZZA}"),
        message_update(4, -2, PIZZA),
        message_update(5, -1, "no pizza"),
        hunger(6, -1),
    ]
    replies = []
    for raw in updates:
        replies += [c.params["text"] for c in (await run.process(decode_update(encode(raw)))).to_send]
    assert replies == ["Your hunger level is 0!", "Your hunger level is 2!"]


SESSIONS_MD = Path(__file__).parent.parent / "docs" / "SESSIONS.md"
PIZZA_BOT_REPLY = "Your hunger level is 1!"


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """Each ```python block with the line it starts on."""
    return [
        (markdown.count("\n", 0, match.start()) + 1, match.group(1))
        for match in re.finditer(r"```python\n(.*?)```", markdown, re.DOTALL)
    ]


async def replies(bot: Bot[Any]) -> list[str]:
    """A 🍕 and then /hunger, in a group, from a user: what the bot answers. Then the page's other
    commands (/reset, /forget_me), so that their handlers run too."""
    run = Pipeline(bot, MemoryStorage(), BotIdentity(1, "pizza_bot"), Metrics())
    said = [PIZZA, "/hunger", "/reset", "/forget_me"]
    outcomes = [await run.process(text_update(n, -1, text)) for n, text in enumerate(said, start=1)]
    assert {o.status for o in outcomes}.isdisjoint({Status.FAILED, Status.DEAD_LETTER})
    return [c.params["text"] for o in outcomes for c in o.to_send]


def test_every_python_block_in_sessions_md_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read top to bottom like a notebook: each block runs after the ones above it, and each bot a block
    builds answers a 🍕 and a /hunger without failing (the full pizza bots count the 🍕)."""

    @dataclass
    class Pizza:
        count: int = 0

    module = ModuleType("sessions_md")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    namespace = module.__dict__
    namespace["Pizza"] = Pizza
    blocks = python_blocks(SESSIONS_MD.read_text())
    assert len(blocks) > 10
    bots_run = 0
    for line, code in blocks:
        bot_before = namespace.get("bot")
        try:
            exec(compile(code, f"{SESSIONS_MD.name}:{line}", "exec"), namespace)  # noqa: S102
            bot = namespace.get("bot")
            if bot is not bot_before:
                answered = asyncio.run(replies(bot))
                if "has_pizza" in code and "hunger" in code:
                    assert answered == [PIZZA_BOT_REPLY]
                bots_run += 1
        except Exception as exc:
            raise AssertionError(f"docs/SESSIONS.md, the block at line {line}: {exc!r}") from exc
    assert bots_run >= 10


GUIDE_MD = Path(__file__).parent.parent / "docs" / "GUIDE.md"


def run_the_guide(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The guide's Python blocks run top to bottom, like a notebook: what they define."""
    module = ModuleType("guide_md")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for line, code in python_blocks(GUIDE_MD.read_text()):
        try:
            exec(compile(code, f"{GUIDE_MD.name}:{line}", "exec"), namespace)  # noqa: S102
        except Exception as exc:
            raise AssertionError(f"docs/GUIDE.md, the block at line {line}: {exc!r}") from exc
    return namespace


def test_the_guides_python_blocks_run_and_its_to_do_bot_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guide read top to bottom: its first bot passes its own test block, and the to-do bot that its
    later blocks assemble adds, ticks off, clears, and answers a mistake through the error hook."""
    namespace = run_the_guide(monkeypatch)

    async def conversation() -> list[str]:
        run = Pipeline(namespace["bot"], MemoryStorage(), BotIdentity(1, "todo_bot"), Metrics())
        updates = [
            message_update(1, 5, "/add milk", from_id=5),
            callback_update(2, 5, 5, "done:1"),
            message_update(3, 5, "/clear", from_id=5),
        ]
        sent = []
        for raw in updates:
            outcome = await run.process(decode_update(encode(raw)))
            assert outcome.status is Status.APPLIED
            sent += [(c.method, c.params.get("text")) for c in outcome.to_send]
        return sent

    assert asyncio.run(conversation()) == [
        ("sendMessage", "▫️ 1. milk"),
        ("answerCallbackQuery", "Done: milk"),
        ("editMessageText", "✅ 1. milk"),
        ("sendMessage", "The list is cleared."),
    ]


def off_the_api(method: str, params: dict[str, Any]) -> set[str]:
    """The parameters `method` does not have, and the required ones left out (bot/methods.py's types of
    them, which mypy reads: a handler run without mypy passes misspelt ones on as they are)."""
    spec = getattr(methods, f"{method[0].upper()}{method[1:]}Params", None)
    if spec is None:  # a method without parameters
        return set(params)
    return (set(params) - spec.__required_keys__ - spec.__optional_keys__) | (
        spec.__required_keys__ - set(params)
    )


def test_every_handler_the_guide_defines_runs_against_the_fake_bot_api(
    monkeypatch: pytest.MonkeyPatch, fake: FakeTelegram, telegram_root: str
) -> None:
    """The handlers the to-do conversation above leaves out, each reached once, with `ctx.api` calling the
    fake Bot API: a name or a parameter that drifted in any of them fails here, not only in a reader's
    hands. A group member's /clear is refused by the admin middleware (getChatMember) through the error
    hook; the inline router's search, mirror (a download) and thank-you; the first bot's /start; and the
    reminder dialog's /cancel."""
    guide = run_the_guide(monkeypatch)
    shop: Bot[None] = Bot(name="guide-inline")
    shop.include_router(guide["inline"])  # the guide shows this router's handlers, and includes it nowhere

    async def conversation() -> list[tuple[str, str | None]]:
        async with httpx.AsyncClient() as http:
            api = BotApi(TOKEN, http, telegram_root)
            photo = await ImmediateApi(api, timeout=5).send_photo(
                chat_id=5, photo=InputFile(b"PNG", filename="a.png")
            )
            assert photo.photo
            picture = {
                "photo": [
                    {"file_id": photo.photo[-1].file_id, "file_unique_id": "u", "width": 1, "height": 1}
                ]
            }
            fake.admins[-100] = {7}  # and not 5, who asks for /clear there
            counter, todo, remind = (
                Pipeline(app, MemoryStorage(), BotIdentity(1, "guide_bot"), Metrics(), api=api)
                for app in (guide["build_bot"](), guide["bot"], guide["remind_bot"])
            )
            inline = Pipeline(shop, MemoryStorage(), BotIdentity(1, "guide_bot"), Metrics(), api=api)
            steps = [
                (counter, message_update(1, 5, "/start", from_id=5)),
                (todo, message_update(2, -100, "/clear", from_id=5)),
                (inline, inline_query_update(3, 5, "milk")),
                (inline, message_update(4, 5, extra=picture, from_id=5)),
                (inline, successful_payment_update(5, 5, 5, "bread", 3)),
                (remind, message_update(6, -100, "/remind", from_id=5)),
                (remind, message_update(7, -100, "/cancel", from_id=5)),
            ]
            calls = []
            for run, update in steps:
                outcome = await run.process(update)
                assert outcome.status in (Status.APPLIED, Status.FAILED), (update, outcome)
                calls += [(c.method, c.params) for c in outcome.to_send]
        made_now = [(c.method, c.params) for c in fake.calls()]  # getChatMember, getFile
        for method, params in calls + made_now:
            assert not off_the_api(method, params), (method, off_the_api(method, params))
        return [(method, params.get("text")) for method, params in calls]

    assert asyncio.run(conversation()) == [
        ("sendMessage", "Hi! Say anything and I count it; /count tells you how many."),
        ("sendMessage", "Only the group's admins can do that."),
        ("answerInlineQuery", None),
        ("sendDocument", None),
        ("sendMessage", "Thank you for 3 ⭐ (receipt charge-5)"),
        ("sendMessage", "What should I remind you of?"),
        ("sendMessage", "Cancelled."),
    ]
