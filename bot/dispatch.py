"""A tiny dispatcher: handlers registered in order, and the first one whose rule matches an update runs.

First match, as in grammY where `bot.command` does not call `next()`: a message that is our /hunger
command is answered and not also counted as a 🍕 text. Matching is pure, so the pipeline knows before
touching the database whether an update concerns the bot at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

from .context import DEFAULT_SESSION, BotIdentity, Context
from .rules import parse_command
from .session import SessionConfig
from .telegram import Message, Update

__all__ = ["Bot", "Handler"]

S = TypeVar("S")

Handler = Callable[[Context[S]], Awaitable[None]]
Rule = Callable[[Update, BotIdentity], bool]


class Bot(Generic[S]):
    """Handlers and sessions; the pipeline (`bot.pipeline`) runs them for each update.

    `session` is the default session (`ctx.session`); `sessions` adds named ones (`ctx.fragment(name)`),
    for example one per chat and one per user.
    """

    def __init__(
        self,
        session: SessionConfig[S] | None = None,
        *,
        sessions: Mapping[str, SessionConfig[Any]] | None = None,
    ) -> None:
        self.sessions: dict[str, SessionConfig[Any]] = dict(sessions or {})
        if session is not None:
            self.sessions[DEFAULT_SESSION] = session
        _check_distinct_keys(self.sessions)
        self._routes: list[tuple[Rule, Handler[S]]] = []
        # Messages the playground offers as one-click buttons ("{username}" becomes the bot's); the
        # first is also what its "send 20 at once" sends.
        self.examples: list[str] = []

    def on(self, rule: Rule) -> Callable[[Handler[S]], Handler[S]]:
        def register(handler: Handler[S]) -> Handler[S]:
            self._routes.append((rule, handler))
            return handler

        return register

    def command(self, name: str) -> Callable[[Handler[S]], Handler[S]]:
        """`/name`, `/name@ourbot` and `/name with arguments`, in a new message of any chat."""

        def rule(update: Update, me: BotIdentity) -> bool:
            message = update.new_message
            command = None if message is None else parse_command(message, me.username)
            return command is not None and command.name == name

        return self.on(rule)

    def on_message(self, predicate: Callable[[Message], bool]) -> Callable[[Handler[S]], Handler[S]]:
        """New messages (not edits) in any chat, including channel posts, that satisfy `predicate`."""

        def rule(update: Update, me: BotIdentity) -> bool:
            message = update.new_message
            return message is not None and predicate(message)

        return self.on(rule)

    def route(self, update: Update, me: BotIdentity) -> Handler[S] | None:
        return next((handler for rule, handler in self._routes if rule(update, me)), None)


def _check_distinct_keys(sessions: Mapping[str, SessionConfig[Any]]) -> None:
    """Two sessions in one storage with the same key function and prefix would be one row, each update
    overwriting the other's data with its own. Easy to do by accident, since every session is keyed by
    chat id and kept in the bot's storage unless told otherwise."""
    seen: dict[tuple[int, str, object], str] = {}
    for name, config in sessions.items():
        where = (id(config.storage), config.prefix, config.get_session_key)
        if where in seen:
            raise ValueError(
                f"sessions {seen[where]!r} and {name!r} would share their rows (same storage, key function "
                "and prefix): give one of them a prefix"
            )
        seen[where] = name
