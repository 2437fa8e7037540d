"""The pizza bot with a lazy session: loaded (and its row locked) only by handlers that ask for it."""

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
    bot = Bot(session(initial=Pizza, lazy=True))

    @bot.command("hunger")
    async def hunger(ctx: Context[Pizza]) -> None:
        pizza = await ctx.get_session()
        ctx.reply(f"Your hunger level is {pizza.count}!")

    @bot.command("start")
    async def start(ctx: Context[Pizza]) -> None:
        ctx.reply("Send 🍕 and ask /hunger.")  # no session touched: no row read, none locked

    @bot.message(has_pizza)
    async def pizza(ctx: Context[Pizza]) -> None:
        (await ctx.get_session()).count += 1

    return bot
