"""A bot with a bug in every place a bug can be, and the same bot fixed (tests/test_dead_letters.py).

Every update adds 1 to its chat's `count` once its code works; each kind of failure has its own text (or,
for the filter, a button's data). `build_broken` fails on those, `build_fixed` applies them: what a
developer deploys after reading `python -m bot dead-letters`, before `python -m bot replay --all`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bot.context import Context
from bot.dispatch import Bot
from bot.filters import text
from bot.session import session

# What fails in the broken bot, by the message text that makes it fail (the filter: a button's data).
FAILING_TEXTS = {
    "middleware": "RuntimeError: middleware bug",
    "handler": "ZeroDivisionError: division by zero",
    "nul in the session \x00": "StorageRefused",  # jsonb refuses \u0000 in a string
    "nul in a reply \x00": "StorageRefused",
    "cannot encode": "SessionValueError",  # an object in the session's list
    "wrong type": "SessionValueError",  # a str where the session's class says int
}
FILTER_DATA = "oops"


@dataclass
class Tally:
    count: int = 0
    notes: list[Any] = field(default_factory=list)


def _build(fixed: bool) -> Bot[Tally]:
    bot: Bot[Tally] = Bot(session(Tally))

    @bot.use
    async def middleware(ctx: Context[Tally], next: Callable[[], Awaitable[None]]) -> None:
        if not fixed and ctx.message is not None and ctx.message.text == "middleware":
            raise RuntimeError("middleware bug")
        await next()

    @bot.callback_query(lambda ctx: (fixed and not (ctx.data or "").isdigit()) or int(ctx.data or "") > 3)
    async def button(ctx: Context[Tally]) -> None:
        ctx.session.count += 1
        ctx.answer()

    @bot.message(text(equals="count"))
    async def count(ctx: Context[Tally]) -> None:
        ctx.reply(f"count {ctx.session.count}")

    @bot.message()
    async def anything(ctx: Context[Tally]) -> None:
        said = ctx.message.text if ctx.message is not None else None
        ctx.session.count += 1
        if said == "handler" and not fixed:
            ctx.session.count += 1 / 0  # type: ignore[assignment]
        elif said is not None and said.startswith("nul"):
            # The message carries \u0000; the fixed bot drops it before storing or sending it.
            kept = said if not fixed else said.replace("\x00", "")
            if "session" in said:
                ctx.session.notes.append(kept)
            else:
                ctx.reply(kept)
        elif said == "cannot encode":
            ctx.session.notes.append(object() if not fixed else "an object")
        elif said == "wrong type" and not fixed:
            ctx.session.count = "seven"  # type: ignore[assignment]

    return bot


def build_broken() -> Bot[Tally]:
    return _build(fixed=False)


def build_fixed() -> Bot[Tally]:
    return _build(fixed=True)
