"""A bot for the timer fault tests and the timer benchmark: it schedules timers on command and records
every fire in its chat's session, so that a fire applied twice, or not at all, shows.

    /at <epoch seconds> <tag>          a timer named <tag>, due then (no reply)
    /at <epoch seconds> <tag> quiet    the same, and its fire sends nothing (only the session changes)
    /fired                             this chat's fires, in order: "tag tag ..." (or "none")

A fire appends its tag to the chat's list and replies `fired <tag> at <epoch> late <s> by <pid>`:
when it ran by this machine's clock, how late the framework says it was, and which process ran it.

    python -m bot serve --app bot.testing.timer_app:build_bot
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ..context import Context
from ..dispatch import Bot
from ..session import session

__all__ = ["Fires", "build_bot"]


@dataclass
class Fires:
    tags: list[str] = field(default_factory=list)


def build_bot() -> Bot[Fires]:
    bot = Bot(session(initial=Fires, prefix="fires:", lazy=True), name="timer-test-bot")

    @bot.command("at")
    async def at(ctx: Context[Fires]) -> None:
        assert ctx.command is not None
        due, tag, *quiet = ctx.command.args.split()
        ctx.schedule("fire", at=float(due), payload={"tag": tag, "reply": not quiet}, name=tag)

    @bot.timer("fire")
    async def fire(ctx: Context[Fires]) -> None:
        assert ctx.timer is not None
        fires: Fires = await ctx.get_session()
        fires.tags.append(ctx.timer.payload["tag"])
        if ctx.timer.payload["reply"]:
            ctx.reply(
                f"fired {ctx.timer.payload['tag']} at {time.time():.6f}"
                f" late {ctx.timer.late:.6f} by {os.getpid()}"
            )

    @bot.command("fired")
    async def fired(ctx: Context[Fires]) -> None:
        fires: Fires = await ctx.get_session()
        ctx.reply(" ".join(fires.tags) or "none")

    return bot
