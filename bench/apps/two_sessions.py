"""The benchmark's second bot: the pizza bot with a per-user session beside the chat's, as most real bots
are (examples/todo.py: a chat's list and each person's stats), and a count of handler runs.

    python -m bot serve --app two_sessions:build_bot     # with bench/apps on PYTHONPATH (bench/run.py: -s bot2)

A 🍕 adds 1 to its chat's count and 1 to its sender's; `/hunger` answers `Your hunger level is N! User U:
M` (the chat's count, the sender's id and count), so the benchmark checks both sessions for lost and
extra increments. A middleware counts every run of the handlers (as a user's timing middleware would
log one line per run), and `/runs` answers that count: the benchmark divides it by the updates it sent
that have a handler, which is 1.0 when every handler ran once. The count is the process's own, in
memory: with several processes each is asked in turn; with WEB_CONCURRENCY > 1 the worker that takes
`/runs` answers only for itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bot import Bot, Context, session, user_key
from bot.apps.pizza import PizzaSession, has_pizza, merge

__all__ = ["Eater", "build_bot"]


@dataclass
class Eater:
    """One per person, across chats."""

    pizzas: int = 0


def build_bot() -> Bot[PizzaSession]:
    runs = 0  # handler runs of this process, /runs excluded (it is how the count is read)

    bot = Bot(
        session(initial=PizzaSession, merge=merge),
        sessions={"me": session(initial=Eater, get_session_key=user_key, prefix="user:", lazy=True)},
        name="two-sessions-bot",
    )

    @bot.use
    async def count_runs(ctx: Context[Any], next: Callable[[], Awaitable[None]]) -> None:
        nonlocal runs
        if ctx.command is None or ctx.command.name != "runs":
            runs += 1
        await next()

    @bot.command("runs")
    async def report_runs(ctx: Context[PizzaSession]) -> None:
        ctx.reply(f"runs {runs}")

    @bot.command("hunger")
    async def hunger(ctx: Context[PizzaSession]) -> None:
        me: Eater = await ctx.get_session("me")
        user = ctx.from_user.id if ctx.from_user is not None else 0
        ctx.reply(f"Your hunger level is {ctx.session.pizza_count}! User {user}: {me.pizzas}")

    @bot.message(has_pizza)
    async def pizza(ctx: Context[PizzaSession]) -> None:
        ctx.session.pizza_count += 1
        (await ctx.get_session("me")).pizzas += 1

    return bot
