"""Filters: which updates a handler wants, as objects that combine with `&`, `|` and `~` (aiogram's
`filters/logic.py`), built from plain functions of the context, sync or async (grammY's `filter`).

Filters run before the database is touched, for every handler of the update's kind, so they must be pure:
look at the update (`ctx.update`, `ctx.message`, `ctx.me`...), never at a session (reading one raises
SessionNotLoaded) and never at the network. An update whose filters all say no costs no database work.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias

from .callables import check_callable

if TYPE_CHECKING:
    from .context import Context

__all__ = [
    "Check",
    "Filter",
    "as_filter",
    "chat_type",
    "command",
    "data_startswith",
    "from_user",
    "text",
]

Check: TypeAlias = "Callable[[Context[Any]], bool | Awaitable[bool]]"


class Filter:
    """A check on an update's context. `Filter(fn)` makes any function combinable:
    `command("add") & ~from_user(42)`, `chat_type("group") | chat_type("supergroup")`.
    Combinations short-circuit left to right, as `and`/`or` do."""

    __slots__ = ("_check",)

    def __init__(self, check: Check) -> None:
        check_callable(check, "filter", "ctx")  # a string where `text(equals=...)` was meant, say
        self._check = check

    async def __call__(self, ctx: Context[Any]) -> bool:
        return await settle(self._check(ctx))

    def direct(self) -> Callable[[Context[Any]], Any]:
        """What answers for this filter as it comes: a bool (nearly always), another value to take as
        one, or an awaitable of either (`settle` makes it a bool). For a plain filter its function, so
        that the router calls it with no frame of ours around it, on every update; for one whose class
        answers with a `__call__` of its own (a combination, a user's subclass), the filter itself."""
        if type(self).__call__ is Filter.__call__:
            return self._check
        return self

    def __and__(self, other: Check) -> Filter:
        return _All((self, as_filter(other)))

    def __or__(self, other: Check) -> Filter:
        return _Any((self, as_filter(other)))

    def __invert__(self) -> Filter:
        return _Not(self)

    # A plain function on the left (`check & Filter`): still evaluated first.
    def __rand__(self, other: Check) -> Filter:
        return _All((as_filter(other), self))

    def __ror__(self, other: Check) -> Filter:
        return _Any((as_filter(other), self))


class _All(Filter):
    __slots__ = ("_parts",)

    def __init__(self, parts: Iterable[Filter]) -> None:
        self._parts = tuple(part.direct() for part in parts)

    async def __call__(self, ctx: Context[Any]) -> bool:
        for part in self._parts:
            answer = part(ctx)
            if answer is not True and (answer is False or not await settle(answer)):
                return False
        return True


class _Any(Filter):
    __slots__ = ("_parts",)

    def __init__(self, parts: Iterable[Filter]) -> None:
        self._parts = tuple(part.direct() for part in parts)

    async def __call__(self, ctx: Context[Any]) -> bool:
        for part in self._parts:
            answer = part(ctx)
            if answer is True or (answer is not False and await settle(answer)):
                return True
        return False


class _Not(Filter):
    __slots__ = ("_inner",)

    def __init__(self, inner: Filter) -> None:
        self._inner = inner.direct()

    async def __call__(self, ctx: Context[Any]) -> bool:
        return not await settle(self._inner(ctx))


async def settle(answer: Any) -> bool:
    """A filter's answer (`Filter.direct`) as a bool, awaited first if it is awaitable."""
    if answer is True or answer is False:  # the common case, without inspecting
        return answer
    if inspect.isawaitable(answer):
        answer = await answer
    return bool(answer)


def as_filter(check: Check) -> Filter:
    return check if isinstance(check, Filter) else Filter(check)


def command(*names: str) -> Filter:
    """The message is one of these commands to this bot: `/name`, `/name@ourbot`, with or without
    arguments (`ctx.command.args`). `/name@another_bot` is not ours."""
    wanted = frozenset(names)

    def check(ctx: Context[Any]) -> bool:
        parsed = ctx.command
        return parsed is not None and parsed.name in wanted

    return Filter(check)


def text(*, equals: str | None = None, contains: str | None = None, startswith: str | None = None) -> Filter:
    """The message's text (not a caption) equals, contains or starts with the given strings; with no
    arguments, any text."""

    def check(ctx: Context[Any]) -> bool:
        message = ctx.update.any_message
        value = None if message is None else message.text
        return (
            value is not None
            and (equals is None or value == equals)
            and (contains is None or contains in value)
            and (startswith is None or value.startswith(startswith))
        )

    return Filter(check)


def chat_type(*types: str) -> Filter:
    """The update happened in a chat of one of these types: private, group, supergroup, channel."""
    wanted = frozenset(types)
    return Filter(lambda ctx: ctx.chat is not None and ctx.chat.type in wanted)


def from_user(*ids: int) -> Filter:
    """The update was caused by one of these users."""
    wanted = frozenset(ids)
    return Filter(lambda ctx: ctx.from_user is not None and ctx.from_user.id in wanted)


def data_startswith(prefix: str) -> Filter:
    """A button press whose callback data starts with `prefix` (the rest is in `ctx.data`)."""

    def check(ctx: Context[Any]) -> bool:
        query = ctx.update.callback_query
        return query is not None and query.data is not None and query.data.startswith(prefix)

    return Filter(check)
