"""The pizza bot: every text with 🍕 feeds the chat's counter, and /hunger reports it."""

from __future__ import annotations

from dataclasses import dataclass

from .context import Context
from .dispatch import Bot
from .rules import PIZZA, contains_pizza
from .session import session


@dataclass
class PizzaSession:
    pizza_count: int = 0


def merge(old: PizzaSession, new: PizzaSession) -> PizzaSession:
    """A group upgraded to a supergroup keeps its count (and adds what the new chat already had)."""
    return PizzaSession(old.pizza_count + new.pizza_count)


def build_bot() -> Bot[PizzaSession]:
    bot = Bot(session(initial=PizzaSession, merge=merge))
    bot.examples = [PIZZA, "/hunger", "/hunger@{username}"]

    @bot.command("hunger")
    async def hunger(ctx: Context[PizzaSession]) -> None:
        ctx.reply(f"Your hunger level is {ctx.session.pizza_count}!")

    @bot.on_message(contains_pizza)
    async def pizza(ctx: Context[PizzaSession]) -> None:
        ctx.session.pizza_count += 1

    return bot
