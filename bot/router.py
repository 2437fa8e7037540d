"""Routers: handlers with their filters and middleware, included into one another and into the bot
(aiogram's `Router.include_router`, grammY's `Composer`).

An update is routed in two steps. `match` (pure, before any database work) evaluates the filters of every
handler registered for the update's kind and keeps the routers that have a match; `run` (inside the
update's transaction, sessions loaded) calls the first matching handler, wrapped in the middleware of the
routers on its way from the bot. A handler that raises SkipHandler falls through to the next match, as a
grammY handler calling `next()` does; a router's middleware runs once, around all its matches.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from .callables import check_async
from .context import Context
from .errors import BotError
from .filters import Check, as_filter, command, settle
from .kinds import KindRoutes
from .types import UPDATE_KINDS

__all__ = ["Handler", "Middleware", "Next", "Router", "SkipHandler"]

S = TypeVar("S")

Handler: TypeAlias = Callable[[Context[S]], Awaitable[None]]
Next: TypeAlias = Callable[[], Awaitable[None]]
Middleware: TypeAlias = Callable[[Context[S], Next], Awaitable[None]]
H = TypeVar("H", bound=Callable[..., Awaitable[None]])

# What each registration method listens to. `message` is a new message in any chat, channel posts
# included (aiogram splits those; a bot counting messages wants both); `edited_message` likewise.
MESSAGE = ("message", "channel_post")
EDITED = ("edited_message", "edited_channel_post")


class SkipHandler(BotError):
    """Raised by a handler that, after looking, does not want this update: the next matching handler
    gets it. Session changes it made so far stay."""


@dataclass(frozen=True, slots=True)
class _Route(Generic[S]):
    kinds: frozenset[str]
    # Each filter's `Filter.direct`: for a plain filter its function itself, called with no frame of ours
    # around it (`match` runs every handler's filters of the update's kind, on every update).
    checks: tuple[Callable[[Context[Any]], Any], ...]
    handler: Handler[S]


# What `match` found in one router: its matching handlers and matching child routers, in the order
# they were registered or included.
Match: TypeAlias = "list[Handler[Any] | tuple[Router[Any], Match]]"


class Router(KindRoutes, Generic[S]):
    """Handlers, their filters and middleware. `Bot` is a Router too: register on it directly for a small
    bot, or on routers included into it for a bigger one. Every update kind has its decorator
    (`@router.inline_query()`, `@router.poll_answer()`...: `bot.kinds.KindRoutes`)."""

    def __init__(self, name: str = "") -> None:
        self.name = name or f"router@{id(self):x}"
        self._entries: list[_Route[S] | Router[S]] = []
        self._middleware: list[Middleware[S]] = []
        self._parent: Router[S] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # --- registration ------------------------------------------------------------------------------

    def on(self, kinds: str | Iterable[str], *filters: Check) -> Callable[[H], H]:
        """Register a handler, `async def handler(ctx)`, for these update kinds (see
        `bot.types.UPDATE_KINDS`), run when every filter agrees. A filter that is not a function of the
        context, or a handler that is not an `async def` taking it, is refused here (TypeError)."""
        wanted = frozenset([kinds] if isinstance(kinds, str) else kinds)
        unknown = wanted - set(UPDATE_KINDS)
        if unknown or not wanted:
            raise ValueError(f"{self!r}: unknown update kinds {sorted(unknown)}; known: {UPDATE_KINDS}")
        checks = tuple(as_filter(f).direct() for f in filters)

        def register(handler: H) -> H:
            check_async(handler, "handler", "ctx")
            self._entries.append(_Route(wanted, checks, handler))
            return handler

        return register

    def message(self, *filters: Check) -> Callable[[H], H]:
        """New messages in any chat, channel posts included."""
        return self.on(MESSAGE, *filters)

    def command(self, name: str, *filters: Check) -> Callable[[H], H]:
        """`/name`, `/name@ourbot` and `/name with arguments` in a new message."""
        return self.on(MESSAGE, command(name), *filters)

    def edited_message(self, *filters: Check) -> Callable[[H], H]:
        return self.on(EDITED, *filters)

    def callback_query(self, *filters: Check) -> Callable[[H], H]:
        """Inline keyboard button presses. Answer each one (`ctx.answer()`), or the user's client shows a
        spinner until it times out."""
        return self.on("callback_query", *filters)

    def my_chat_member(self, *filters: Check) -> Callable[[H], H]:
        """The bot's own membership changed: added to a group, made admin, removed, blocked by a user."""
        return self.on("my_chat_member", *filters)

    def chat_member(self, *filters: Check) -> Callable[[H], H]:
        """Someone else's membership changed (the bot must be an admin, and Telegram sends these only when
        asked for in allowed_updates: registering a handler does that)."""
        return self.on("chat_member", *filters)

    def message_reaction(self, *filters: Check) -> Callable[[H], H]:
        """A user changed their reactions to a message (the bot must be an admin of the chat)."""
        return self.on("message_reaction", *filters)

    def use(self, middleware: Middleware[S]) -> Middleware[S]:
        """Add a middleware, `async def mw(ctx, next)`, around this router's handlers (and those of the
        routers included in it). It runs inside the update's transaction with the sessions loaded, only
        for updates one of those handlers wants; code after `await next()` runs after the handler, and
        not calling `next` ends the update there: no handler after it runs, here or in another router,
        and what it changed is saved. Usable as a decorator."""
        check_async(middleware, "middleware", "ctx, next")
        self._middleware.append(middleware)
        return middleware

    def include_router(self, router: Router[S]) -> Router[S]:
        """Route to `router` too, after the handlers and routers registered here so far."""
        if router._parent is not None:
            raise ValueError(f"{router!r} is already included in {router._parent!r}")
        ancestor: Router[S] | None = self
        while ancestor is not None:
            if ancestor is router:
                raise ValueError(f"including {router!r} in {self!r} would make a cycle")
            ancestor = ancestor._parent
        router._parent = self
        self._entries.append(router)
        return router

    # --- what is registered ------------------------------------------------------------------------

    def update_kinds(self) -> set[str]:
        """The update kinds some handler here or below listens to."""
        kinds: set[str] = set()
        for entry in self._entries:
            kinds |= entry.update_kinds() if isinstance(entry, Router) else entry.kinds
        return kinds

    # --- routing -----------------------------------------------------------------------------------

    async def match(self, ctx: Context[S], kind: str) -> Match:
        """Every handler here or below whose kind and filters accept the update. Pure: no database."""
        found: Match = []
        for entry in self._entries:
            # (_Route first: an isinstance() against Router goes through ABCMeta, for every entry of
            # every update, as KindRoutes is an ABC.)
            if isinstance(entry, _Route):
                if kind in entry.kinds:
                    # Every filter agrees, asked in order until one does not.
                    for check in entry.checks:
                        answer = check(ctx)
                        if answer is not True and (answer is False or not await settle(answer)):
                            break
                    else:
                        found.append(entry.handler)
            else:
                below = await entry.match(ctx, kind)
                if below:
                    found.append((entry, below))
        return found

    def run(self, ctx: Context[S], found: Match, _index: int = 0) -> Coroutine[Any, Any, bool]:
        """Run this router's middleware around its first match that does not skip. True if the update is
        done (a handler took it, or a middleware ended it by not calling next); False if every match
        skipped, so the parent tries its next match. (`_index`: the middleware to start from, for the
        `next` of the one before it.)

        Not a coroutine itself but the one that does the work, so that each level costs one: the
        middleware's (`_around`, whose closure holds the chain's state) or the handlers' (none)."""
        if _index < len(self._middleware):
            return self._around(ctx, found, _index)
        return self._handlers(ctx, found)

    async def _handlers(self, ctx: Context[S], found: Match) -> bool:
        for item in found:
            if isinstance(item, tuple):
                router, below = item
                if await router.run(ctx, below):
                    return True
                continue
            try:
                await item(ctx)
            except SkipHandler:
                continue
            return True
        return False

    async def _around(self, ctx: Context[S], found: Match, index: int) -> bool:
        middleware = self._middleware[index]
        handled = called = reached = False

        async def next_() -> None:
            nonlocal handled, called, reached
            if called:
                raise RuntimeError(f"middleware {middleware!r} called next() twice")
            called = True
            handled = await self.run(ctx, found, index + 1)
            reached = True

        await middleware(ctx, next_)
        # A middleware here or further in that did not call next ended the update.
        return handled or not reached
