"""Reminders: the fourth bot on the framework, and the worked example of dialogs and timers in docs/GUIDE.md.

    python -m bot serve --app examples.remind:build_bot       # webhook (local trial without BOT_TOKEN)
    python -m bot poll --app examples.remind:build_bot        # long polling, with BOT_TOKEN and DATABASE_URL

The chat protocol (tests and outside checks drive it by these words):

    /remind            → What should I remind you of?
    water the plants   → When? (like 30s, 10m, 2h)
    10m                → OK, in 10m: water the plants
    ... ten minutes later, in that chat: ⏰ water the plants
    /reminders         → the chat's pending reminders, one per line
    /cancel            → Cancelled. (during the dialog)

The dialog belongs to the person in the chat (two people can each be in the middle of their own), and
ends with "Never mind." after 5 minutes without an answer. Each reminder is a durable timer: stored with
the answer that set it, sent once when due, even across a restart or a kill -9, and late (saying so in
the log) if no process was running when it was due. In a group, the bot sees plain answers only with
privacy mode off (@BotFather, /setprivacy), or when they reply to its question.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from bot import Bot, Context, Dialog, Filter, State, StatesGroup, any_step, chat_user_key, session, text

__all__ = ["Draft", "Remind", "Reminder", "Reminders", "build_bot", "parse_duration"]

ASK_WHAT = "What should I remind you of?"
ASK_WHEN = "When? (like 30s, 10m, 2h)"
MAX_PENDING = 50  # per chat: the list lives in the chat's session, read by every reminder of the chat
MAX_TEXT = 1000
LONGEST = 366 * 86400.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:\d+\s*[smhd]\s*)+")
_PART = re.compile(r"(\d+)\s*([smhd])")


def parse_duration(written: str) -> float | None:
    """Seconds in `30s`, `10m`, `2h`, `1d`, or a sum like `1h 30m`; None for anything else, for zero, and
    for more than a year."""
    spoken = written.strip().lower()
    if not _DURATION.fullmatch(spoken):
        return None
    seconds = float(sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(spoken)))
    return seconds if 0 < seconds <= LONGEST else None


def left(seconds: float) -> str:
    """A short "how long from now": 45s, 9m 30s, 2h 5m, 3d 4h."""
    seconds = max(0, round(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])


@dataclass
class Reminder:
    id: int
    what: str
    due: float  # epoch seconds, for /reminders; the timer keeps the real due time


@dataclass
class Reminders:
    """One per chat: what is still to be sent there."""

    pending: list[Reminder] = field(default_factory=list)
    next_id: int = 1


class Remind(StatesGroup):
    what = State()
    when = State()


@dataclass
class Draft:
    """The dialog's data between its two questions."""

    what: str = ""


def _is_answer(ctx: Context[Reminders]) -> bool:
    # A command is never an answer: /reminders or /cancel during the dialog does what it says.
    message = ctx.update.any_message
    return message is not None and message.text is not None and not message.text.startswith("/")


answer = text() & Filter(_is_answer)


def build_bot(*, dialog_timeout: float = 300.0) -> Bot[Reminders]:
    # Lazy: the dialog's steps do not lock the chat's list, only the one that adds to it.
    bot = Bot(session(initial=Reminders, prefix="remind:", lazy=True), name="remind-bot")
    bot.examples = ["/remind", "water the plants", "30s", "/reminders"]
    dialog: Dialog[Draft] = Dialog(Remind, Draft, key=chat_user_key, timeout=dialog_timeout)

    @bot.command("remind", lambda ctx: ctx.from_user is not None)
    async def remind(ctx: Context[Reminders]) -> None:
        assert ctx.command is not None
        state = await dialog.enter(ctx, Remind.what)
        if ctx.command.args:  # `/remind water the plants`: the first answer came with it
            state.data.what = ctx.command.args[:MAX_TEXT]
            state.set(Remind.when)
            ctx.reply(ASK_WHEN)
        else:
            ctx.reply(ASK_WHAT)

    @dialog.command("cancel", any_step)
    async def cancel(ctx: Context[Reminders]) -> None:
        (await dialog.state(ctx)).clear()
        ctx.reply("Cancelled.")

    @dialog.message(Remind.what, answer)
    async def what(ctx: Context[Reminders]) -> None:
        assert ctx.message is not None and ctx.message.text is not None
        state = await dialog.state(ctx)
        state.data.what = ctx.message.text.strip()[:MAX_TEXT]
        state.set(Remind.when)
        ctx.reply(ASK_WHEN)

    @dialog.message(Remind.when, answer)
    async def when(ctx: Context[Reminders]) -> None:
        assert ctx.message is not None and ctx.message.text is not None
        state = await dialog.state(ctx)
        written = ctx.message.text.strip()
        seconds = parse_duration(written)
        if seconds is None:
            state.set(Remind.when)  # asked again, and the 5 minutes start again
            ctx.reply(ASK_WHEN)
            return
        what = state.data.what
        state.clear()
        reminders: Reminders = await ctx.get_session()
        if len(reminders.pending) >= MAX_PENDING:
            ctx.reply(f"This chat has {MAX_PENDING} reminders waiting already; that is the most it keeps.")
            return
        reminder = Reminder(reminders.next_id, what, time.time() + seconds)
        reminders.next_id += 1
        reminders.pending.append(reminder)
        ctx.schedule("remind", after=seconds, payload=reminder.id, name=f"reminder:{reminder.id}")
        ctx.reply(f"OK, in {written}: {reminder.what}")

    @dialog.on_timeout
    async def gave_up(ctx: Context[Reminders]) -> None:
        ctx.reply("Never mind.")

    bot.include_router(dialog)

    @bot.command("cancel")
    async def nothing_to_cancel(ctx: Context[Reminders]) -> None:
        ctx.reply("Nothing to cancel.")

    @bot.command("reminders")
    async def listing(ctx: Context[Reminders]) -> None:
        reminders: Reminders = await ctx.get_session()
        now = time.time()
        lines = [f"{r.what} (in {left(r.due - now)})" for r in sorted(reminders.pending, key=lambda r: r.due)]
        ctx.reply("\n".join(lines) or "No reminders.")

    @bot.timer("remind")
    async def due(ctx: Context[Reminders]) -> None:
        assert ctx.timer is not None
        reminders: Reminders = await ctx.get_session()
        reminder = next((r for r in reminders.pending if r.id == ctx.timer.payload), None)
        if reminder is not None:
            reminders.pending.remove(reminder)
            ctx.reply(f"⏰ {reminder.what}")

    return bot
