"""The pizza bot with `initial`: every chat starts from a fresh session, so handlers never check."""

from __future__ import annotations

from dataclasses import dataclass

from bot.apps.pizza import has_pizza
from bot.context import Context
from bot.dispatch import Bot
from bot.session import session


@dataclass
class Pizza:
    count: int = 0


def build_bot() -> Bot[Pizza]:
    bot = Bot(session(initial=Pizza))

    @bot.command("hunger")
    async def hunger(ctx: Context[Pizza]) -> None:
        ctx.reply(f"Your hunger level is {ctx.session.count}!")

    @bot.message(has_pizza)
    async def pizza(ctx: Context[Pizza]) -> None:
        ctx.session.count += 1

    return bot
