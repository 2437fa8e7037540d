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
from itertools import combinations
from typing import Any, TypeAlias, TypeVar

from .callables import check_async, describe
from .context import DEFAULT_SESSION, Context
from .dialogs import Dialog
from .errors import BotError
from .router import H, Handler, Middleware, Router, SkipHandler
from .session import SessionConfig, chat_key, chat_user_key, user_key
from .types import UPDATE_KINDS

__all__ = ["Bot", "ErrorHook", "Handler", "Middleware", "NoSuchTimerHandler", "Router", "SkipHandler"]

S = TypeVar("S")

ErrorHook: TypeAlias = Callable[[Exception, Context[Any]], Awaitable[None]]
E = TypeVar("E", bound=ErrorHook)


class NoSuchTimerHandler(BotError, LookupError):
    """A timer names a handler the bot has not registered (`@bot.timer(name)`): a typo in
    `ctx.schedule`, which fails the update that scheduled it, or a handler removed from the code since
    the timer was scheduled, which fails (and keeps) the timer."""


# Always asked for when a session follows group upgrades (`merge`): they arrive as service messages.
_MIGRATION_KINDS = {"message"}


class Bot(Router[S]):
    """Handlers (it is a `Router`), sessions, timer handlers and an error hook.

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
        # Timer handlers by name (`ctx.schedule(name, ...)`); none: no process looks for due timers.
        self.timers: dict[str, Handler[Any]] = {}
        # Messages the playground offers as one-click buttons ("{username}" becomes the bot's); the
        # first is also what its "send 20 at once" sends.
        self.examples: list[str] = []

    def catch(self, hook: E) -> E:
        """Set the error hook, `async def on_error(error, ctx)`, for an exception from the bot's code
        (grammY's `bot.catch`, aiogram's errors router): a handler or middleware, and also a filter, a
        key function, a session that cannot be loaded or saved.

        For a handler or middleware, its session changes and queued calls are discarded first, so the
        hook sees the sessions as loaded and can reply (`ctx.reply("Sorry…")`), change a session, or
        re-raise; for the rest it runs after the update was rolled back, without sessions. What it does
        commits with the update, exactly once; if it raises, the update is rolled back and recorded as
        a dead letter, as without a hook. Database outages never reach it: those answer 503 so Telegram
        redelivers the update. Usable as a decorator.
        """
        check_async(hook, "error hook", "error, ctx")
        self.error_hook = hook
        return hook

    def timer(self, name: str) -> Callable[[H], H]:
        """Register `async def handler(ctx)` for the timers scheduled as `ctx.schedule(name, ...)`. It runs
        once per timer, when due, like a handler of the update that scheduled it: in a transaction of
        its own, with that chat's sessions, its replies sent after the commit; `ctx.timer` says which
        timer, with what payload, and how late."""

        def register(handler: H) -> H:
            self._add_timer(name, handler)
            return handler

        return register

    def _add_timer(self, name: str, handler: Handler[Any]) -> None:
        check_async(handler, "timer handler", "ctx")
        if name in self.timers:
            raise ValueError(f"a timer handler named {name!r} is registered already")
        self.timers[name] = handler

    def include_router(self, router: Router[S]) -> Router[S]:
        """As `Router.include_router`; a `Dialog` also brings its session and its timeout's handler."""
        if not isinstance(router, Dialog):
            return super().include_router(router)
        if router.session_name in self.sessions or router.timer_handler in self.timers:
            raise ValueError(f"{router!r}: another dialog named {router.name!r} is included already")
        sessions = {**self.sessions, router.session_name: replace(router.config, name=router.session_name)}
        _check_distinct_keys(sessions)
        super().include_router(router)
        self.sessions = sessions
        self._add_timer(router.timer_handler, router.timed_out)
        return router

    def allowed_updates(self) -> list[str]:
        """The update kinds to ask Telegram for (setWebhook's and getUpdates' `allowed_updates`): those
        the registered handlers can receive, as aiogram's `resolve_used_update_types` computes them."""
        kinds = self.update_kinds()
        if any(config.merge is not None for config in self.sessions.values()):
            kinds |= _MIGRATION_KINDS
        return [kind for kind in UPDATE_KINDS if kind in kinds]


# The characters of the keys the shipped key functions return: ids (a chat's may be negative), and "/"
# between a chat's and a user's. Of the three, chat_key and user_key can return the same key: a private
# chat's id is its user's id. A custom key function may return anything.
_KEY_CHARACTERS = frozenset("-0123456789/")
_SHIPPED_KEYS = (chat_key, user_key, chat_user_key)
_DISJOINT_KEYS = {frozenset({chat_key, chat_user_key}), frozenset({user_key, chat_user_key})}


def _check_distinct_keys(sessions: Mapping[str, SessionConfig[Any]]) -> None:
    """Refuse two sessions in one storage that could ever compute the same key: they would be one row,
    each overwriting the other's data (or failing to decode it) with no error. Easy to do by accident,
    since every session is kept in the bot's storage without a prefix unless told otherwise: a chat
    session and a `user_key` session share a row in every private chat.

    Refused at build time rather than namespaced by key kind: a namespace would move the rows of every
    bot already running (including those whose prefixes keep them apart today), while a refusal leaves
    every row where it is and stops only the bots whose rows can mix, with the fix in the message."""
    for (first, a), (second, b) in combinations(sessions.items(), 2):
        reason = _why_keys_may_meet(a, b)
        if reason is not None:
            raise ValueError(
                f"sessions {first!r} and {second!r} would share their rows ({reason}): give each one a "
                f"prefix that does not start the other's (for example prefix={second + ':'!r}) or a storage "
                'of its own; docs/SESSIONS.md, "Keys of several sessions", says how to keep existing rows'
            )


def _why_keys_may_meet(a: SessionConfig[Any], b: SessionConfig[Any]) -> str | None:
    """Why two sessions could compute the same stored key (prefix + key), or None if they never can."""
    if a.storage is not b.storage:
        return None
    short, long = sorted((a, b), key=lambda config: len(config.prefix))
    if not long.prefix.startswith(short.prefix):
        return None  # their keys differ within the prefixes
    rest = long.prefix[len(short.prefix) :]
    if rest:
        # A key of `short` equal to one of `long` would have to start with `rest`.
        if short.get_session_key in _SHIPPED_KEYS and not set(rest) <= _KEY_CHARACTERS:
            return None
        return f"prefix {long.prefix!r} starts with prefix {short.prefix!r}"
    if a.get_session_key is b.get_session_key:
        return "same storage, key function and prefix"
    if frozenset({a.get_session_key, b.get_session_key}) in _DISJOINT_KEYS:
        return None
    if a.get_session_key in _SHIPPED_KEYS and b.get_session_key in _SHIPPED_KEYS:
        return "same storage and prefix; in a private chat the chat id is the user id"
    custom = a if a.get_session_key not in _SHIPPED_KEYS else b
    return (
        f"same storage and prefix, and {custom.name!r} is keyed by {describe(custom.get_session_key)}, "
        "which may return any key"
    )


def _check_merge_keys(sessions: Mapping[str, SessionConfig[Any]]) -> None:
    """A group upgrade moves the session keyed by the old chat id to the new chat id; with any other key
    function there is no telling which rows belong to the chat, so `merge` would silently do nothing."""
    for name, config in sessions.items():
        if config.merge is not None and config.get_session_key is not chat_key:
            raise ValueError(
                f"session {name!r}: merge= works only with the default key (chat_key), and this session "
                f"is keyed by {describe(config.get_session_key)!r}"
            )
