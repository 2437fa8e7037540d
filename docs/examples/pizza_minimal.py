"""The pizza bot with no `initial`: a chat without a session reads as None, and the handler creates it."""

from __future__ import annotations

from dataclasses import dataclass

from bot.apps.pizza import has_pizza
from bot.context import Context
from bot.dispatch import Bot
from bot.session import session


@dataclass
class Pizza:
    count: int = 0


def build_bot() -> Bot[Pizza | None]:
    bot: Bot[Pizza | None] = Bot(session(data_type=Pizza))

    @bot.command("hunger")
    async def hunger(ctx: Context[Pizza | None]) -> None:
        count = ctx.session.count if ctx.session is not None else 0
        ctx.reply(f"Your hunger level is {count}!")

    @bot.message(has_pizza)
    async def pizza(ctx: Context[Pizza | None]) -> None:
        if ctx.session is None:
            ctx.session = Pizza()
        ctx.session.count += 1

    return bot
