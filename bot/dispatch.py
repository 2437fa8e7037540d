"""The bot: the root router, plus its sessions and its error hook; the pipeline (`bot.pipeline`) runs it
for each update.

Handlers are tried in the order they were registered, and the first match handles the update (as in
grammY, where `bot.command` does not call `next()`): a message that is a command is not also handled as
plain text unless the command's handler raises SkipHandler. Matching is pure, so the pipeline knows before
touching the database whether an update concerns the bot at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, TypeAlias, TypeVar

from .callables import check_async, describe
from .context import DEFAULT_SESSION, Context
from .router import Handler, Middleware, Router, SkipHandler
from .session import SessionConfig, chat_key
from .telegram import UPDATE_KINDS

__all__ = ["Bot", "ErrorHook", "Handler", "Middleware", "Router", "SkipHandler"]

S = TypeVar("S")

ErrorHook: TypeAlias = Callable[[Exception, Context[Any]], Awaitable[None]]
E = TypeVar("E", bound=ErrorHook)

# Always asked for when a session follows group upgrades (`merge`): they arrive as service messages.
_MIGRATION_KINDS = {"message"}


class Bot(Router[S]):
    """Handlers (it is a `Router`), sessions and an error hook.

    `session` is the default session (`ctx.session`); `sessions` adds named ones (`ctx.fragment(name)`),
    for example one per chat and one per user.
    """

    def __init__(
        self,
        session: SessionConfig[S] | None = None,
        *,
        sessions: Mapping[str, SessionConfig[Any]] | None = None,
        name: str = "bot",
    ) -> None:
        super().__init__(name)
        configs = dict(sessions or {})
        if session is not None:
            configs[DEFAULT_SESSION] = session
        # Each learns the name it is installed under, which its errors (a value that does not fit, a row
        # that no longer decodes) give along with the key.
        self.sessions: dict[str, SessionConfig[Any]] = {
            name: replace(config, name=name) for name, config in configs.items()
        }
        _check_distinct_keys(self.sessions)
        _check_merge_keys(self.sessions)
        self.error_hook: ErrorHook | None = None
        # Messages the playground offers as one-click buttons ("{username}" becomes the bot's); the
        # first is also what its "send 20 at once" sends.
        self.examples: list[str] = []

    def catch(self, hook: E) -> E:
        """Set the error hook, `async def on_error(error, ctx)`, for an exception from a handler or a
        middleware (grammY's `bot.catch`, aiogram's errors router).

        The failed handler's session changes and queued calls are discarded first, so the hook sees the
        sessions as loaded and can reply (`ctx.reply("Sorry…")`), change a session, or re-raise. What it
        does commits with the update, exactly once; if it raises, the update is rolled back, logged and
        acknowledged, as without a hook. Database errors never reach it: those answer 503 so Telegram
        redelivers the update. Usable as a decorator.
        """
        check_async(hook, "error hook", "error, ctx")
        self.error_hook = hook
        return hook

    def allowed_updates(self) -> list[str]:
        """The update kinds to ask Telegram for (setWebhook's and getUpdates' `allowed_updates`): those
        the registered handlers can receive, as aiogram's `resolve_used_update_types` computes them."""
        kinds = self.update_kinds()
        if any(config.merge is not None for config in self.sessions.values()):
            kinds |= _MIGRATION_KINDS
        return [kind for kind in UPDATE_KINDS if kind in kinds]


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


def _check_merge_keys(sessions: Mapping[str, SessionConfig[Any]]) -> None:
    """A group upgrade moves the session keyed by the old chat id to the new chat id; with any other key
    function there is no telling which rows belong to the chat, so `merge` would silently do nothing."""
    for name, config in sessions.items():
        if config.merge is not None and config.get_session_key is not chat_key:
            raise ValueError(
                f"session {name!r}: merge= works only with the default key (chat_key), and this session "
                f"is keyed by {describe(config.get_session_key)!r}"
            )
