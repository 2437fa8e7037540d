"""The pizza bot: every text with 🍕 feeds the chat's counter, and /hunger reports it.

An app like any other on the framework (`python -m bot serve --app bot.apps.pizza:build_bot`, the default).
"""

from __future__ import annotations

from dataclasses import dataclass

from bot import Bot, Context, Filter, Message, session

__all__ = ["PIZZA", "PizzaSession", "build_bot", "contains_pizza", "has_pizza"]

PIZZA = "\N{SLICE OF PIZZA}"  # U+1F355


@dataclass
class PizzaSession:
    pizza_count: int = 0


def contains_pizza(message: Message) -> bool:
    """Text (not a caption) with at least one 🍕. Several in one message still count once."""
    return message.text is not None and PIZZA in message.text


# The same rule as a filter, for `@bot.message(has_pizza)`.
has_pizza = Filter(lambda ctx: ctx.message is not None and contains_pizza(ctx.message))


def merge(old: PizzaSession, new: PizzaSession) -> PizzaSession:
    """A group upgraded to a supergroup keeps its count (and adds what the new chat already had)."""
    return PizzaSession(old.pizza_count + new.pizza_count)


def build_bot() -> Bot[PizzaSession]:
    bot = Bot(session(initial=PizzaSession, merge=merge), name="pizza-bot")
    bot.examples = [PIZZA, "/hunger", "/hunger@{username}"]  # the playground's one-click messages

    @bot.command("hunger")
    async def hunger(ctx: Context[PizzaSession]) -> None:
        ctx.reply(f"Your hunger level is {ctx.session.pizza_count}!")

    @bot.message(has_pizza)
    async def pizza(ctx: Context[PizzaSession]) -> None:
        ctx.session.pizza_count += 1

    return bot
