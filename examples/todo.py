"""A group to-do list: the second bot on the framework, and the worked example of docs/GUIDE.md.

    python -m bot serve --app examples.todo:build_bot       # webhook (local trial without BOT_TOKEN)
    python -m bot poll --app examples.todo:build_bot        # long polling, with BOT_TOKEN and DATABASE_URL

/add <task> adds to the chat's list, which comes back with a ✅ button per open task; pressing one marks
it done for everybody and edits the list in place. /me shows what you added and finished, in any chat.
Admins (a router of its own) can /clear the list. Adding the bot to a group greets it; removing it
deletes the group's list; a 👍 reaction is a cheer on your own stats.

It uses: a per-chat session and a per-user one, commands, inline buttons (callback queries,
answerCallbackQuery, editMessageText), my_chat_member and message_reaction updates, a router with a
middleware that asks Telegram (ctx.api) whether the sender is an admin, a logging middleware around
everything, and an error hook that turns mistakes into replies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bot import Bot, Context, Router, button, chat_type, data_startswith, inline_keyboard, session, user_key
from bot.types import InlineKeyboardMarkup, ReactionTypeEmoji

__all__ = ["Stats", "Task", "TodoList", "build_bot"]

log = logging.getLogger("examples.todo")

MAX_TASKS = 20


@dataclass
class Task:
    id: int
    text: str
    done: bool = False


@dataclass
class TodoList:
    """One per chat (the default key: the chat id)."""

    tasks: list[Task] = field(default_factory=list)
    next_id: int = 1


@dataclass
class Stats:
    """One per person, in every chat (keyed by user id)."""

    added: int = 0
    done: int = 0
    cheers: int = 0


class Mistake(Exception):
    """Something the user should hear about, not a bug: the error hook replies with it."""


def render(todo: TodoList) -> tuple[str, InlineKeyboardMarkup]:
    """The list's text and its keyboard: a ✅ button for each open task."""
    if not todo.tasks:
        return "The list is empty. /add something!", inline_keyboard()
    lines = [f"{'✅' if t.done else '▫️'} {t.id}. {t.text}" for t in todo.tasks]
    buttons = [button(f"✅ {t.id}", f"done:{t.id}") for t in todo.tasks if not t.done]
    return "\n".join(lines), inline_keyboard(*(buttons[i : i + 4] for i in range(0, len(buttons), 4)))


async def timing(ctx: Context[Any], next: Callable[[], Awaitable[None]]) -> None:
    """Around every handled update: how long it took, sessions and handler included."""
    started = time.perf_counter()
    try:
        await next()
    finally:
        elapsed = (time.perf_counter() - started) * 1000
        log.info("update %d (%s): %.1f ms", ctx.update.update_id, ctx.update.kind, elapsed)


def admin_router() -> Router[TodoList]:
    admin: Router[TodoList] = Router("admin")

    @admin.use
    async def only_admins(ctx: Context[TodoList], next: Callable[[], Awaitable[None]]) -> None:
        # A question only Telegram can answer, asked now: the chat's row is locked while it runs, which
        # is fine for a rare admin command and would not be for every message (see ctx.api).
        chat, user = ctx.chat, ctx.from_user
        if chat is None or user is None:
            return
        if chat.type != "private":
            member = await ctx.api.get_chat_member(chat_id=chat.id, user_id=user.id)
            if member.status not in ("creator", "administrator"):
                raise Mistake("Only the group's admins can do that.")
        await next()

    @admin.command("clear")
    async def clear(ctx: Context[TodoList]) -> None:
        ctx.session = None  # deletes the chat's row
        ctx.reply("The list is cleared.")

    return admin


def build_bot() -> Bot[TodoList]:
    bot = Bot(
        # Prefixed, so that a database shared with another app keyed by chat id keeps their rows apart.
        session(initial=TodoList, prefix="todo:"),
        sessions={"me": session(initial=Stats, get_session_key=user_key, prefix="todo-user:", lazy=True)},
        name="todo-bot",
    )
    bot.examples = ["/add buy milk", "/list", "/me"]  # the local playground's one-click messages
    bot.use(timing)

    @bot.command("add")
    async def add(ctx: Context[TodoList]) -> None:
        assert ctx.command is not None
        text = ctx.command.args
        if not text:
            raise Mistake("What should I add? Write it after the command: /add buy milk")
        todo = ctx.session
        if sum(not t.done for t in todo.tasks) >= MAX_TASKS:
            raise Mistake(f"The list has {MAX_TASKS} open tasks already; finish some first.")
        todo.tasks.append(Task(todo.next_id, text))
        todo.next_id += 1
        if ctx.from_user is not None:
            (await ctx.get_session("me")).added += 1
        body, keyboard = render(todo)
        await ctx.reply(body, reply_markup=keyboard)

    @bot.command("list")
    async def show(ctx: Context[TodoList]) -> None:
        body, keyboard = render(ctx.session)
        ctx.reply(body, reply_markup=keyboard)

    @bot.command("me", chat_type("private", "group", "supergroup"))
    async def me(ctx: Context[TodoList]) -> None:
        stats: Stats = await ctx.get_session("me")
        ctx.reply(f"You added {stats.added}, finished {stats.done}, and cheered {stats.cheers} times.")

    @bot.callback_query(data_startswith("done:"))
    async def done(ctx: Context[TodoList]) -> None:
        assert ctx.data is not None
        task_id = int(ctx.data.removeprefix("done:"))
        task = next((t for t in ctx.session.tasks if t.id == task_id), None)
        if task is None or task.done:
            ctx.answer("That one is done already.", show_alert=True)
            return
        task.done = True
        (await ctx.get_session("me")).done += 1
        ctx.answer(f"Done: {task.text}")
        body, keyboard = render(ctx.session)
        ctx.edit_text(body, reply_markup=keyboard)

    @bot.my_chat_member()
    async def membership(ctx: Context[TodoList]) -> None:
        update = ctx.update.my_chat_member
        assert update is not None and update.new_chat_member is not None
        if update.new_chat_member.status in ("left", "kicked"):
            ctx.session = None  # nobody will see this list again
        elif update.old_chat_member is None or update.old_chat_member.status in ("left", "kicked"):
            ctx.reply("Hi! I keep this group's to-do list. /add something to start it.")

    @bot.message_reaction()
    async def cheer(ctx: Context[TodoList]) -> None:
        reaction = ctx.update.message_reaction
        assert reaction is not None
        if reaction.user is not None and any(
            isinstance(r, ReactionTypeEmoji) and r.emoji == "👍" for r in reaction.new_reaction
        ):
            (await ctx.get_session("me")).cheers += 1

    bot.include_router(admin_router())

    @bot.catch
    async def on_error(error: Exception, ctx: Context[TodoList]) -> None:
        if isinstance(error, Mistake) and ctx.chat is not None:
            if ctx.callback_query is not None:
                ctx.answer(str(error), show_alert=True)
            else:
                ctx.reply(str(error))
            return
        raise error  # a bug: rolled back and kept as a dead letter, to replay once fixed

    return bot
