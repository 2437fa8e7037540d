"""A framework for Telegram webhook bots whose state must stay exact: each update is applied once, in one
PostgreSQL transaction with its sessions, and replies leave only after the commit.

The front door: what an app needs, importable from `bot` itself.

    from bot import Bot, Context, session

    def build_bot() -> Bot[Counter]:
        bot = Bot(session(initial=Counter), name="counter-bot")

        @bot.command("count")
        async def count(ctx: Context[Counter]) -> None:
            ctx.reply(f"{ctx.session.seen} so far")

        return bot

Run it with `python -m bot serve --app mybot:build_bot` (docs/GUIDE.md). Everything else (storage,
pipeline, server, the test kit in `bot.testing`) is imported from its own module when needed.
"""

from __future__ import annotations

from .context import BotIdentity, Context, Fire, QueuedCall
from .dialogs import Dialog, DialogState, NoDialog, State, StatesGroup, any_step
from .dispatch import Bot, ErrorHook, NoSuchTimerHandler
from .errors import BotError
from .filters import Filter, chat_type, command, data_startswith, from_user, text
from .keyboards import (
    button,
    contact_button,
    force_reply,
    inline_keyboard,
    location_button,
    remove_keyboard,
    reply_keyboard,
    url_button,
)
from .router import Handler, Middleware, Next, Router, SkipHandler
from .session import SessionError, chat_key, chat_user_key, session, user_key
from .telegram import BotApiError
from .types import CallbackQuery, Chat, InlineQuery, Message, Update, User

__all__ = [
    "Bot",
    "BotApiError",
    "BotError",
    "BotIdentity",
    "CallbackQuery",
    "Chat",
    "Context",
    "Dialog",
    "DialogState",
    "ErrorHook",
    "Filter",
    "Fire",
    "Handler",
    "InlineQuery",
    "Message",
    "Middleware",
    "Next",
    "NoDialog",
    "NoSuchTimerHandler",
    "QueuedCall",
    "Router",
    "SessionError",
    "SkipHandler",
    "State",
    "StatesGroup",
    "Update",
    "User",
    "any_step",
    "button",
    "chat_key",
    "chat_type",
    "chat_user_key",
    "command",
    "contact_button",
    "data_startswith",
    "force_reply",
    "from_user",
    "inline_keyboard",
    "location_button",
    "remove_keyboard",
    "reply_keyboard",
    "session",
    "text",
    "url_button",
    "user_key",
]
