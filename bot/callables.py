"""Checks on the functions an app hands in (handlers, middleware, filters, key functions, hooks), made
when they are registered or the bot is built, so that a function that cannot run is refused with its
name and where it is defined, instead of failing on the first update that reaches it.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["check_async", "check_callable", "check_plain", "describe"]


def describe(function: Any) -> str:
    """`module.qualname (file:line)` for a function, the repr (and type) for anything else."""
    name = getattr(function, "__qualname__", None)
    if not isinstance(name, str):
        return f"{function!r} (a {type(function).__name__})"
    code = getattr(inspect.unwrap(function), "__code__", None)
    where = "" if code is None else f" ({code.co_filename}:{code.co_firstlineno})"
    return f"{getattr(function, '__module__', None) or '?'}.{name}{where}"


def check_callable(function: Any, what: str, params: str) -> None:
    """Raise TypeError unless `function` can be called with the arguments `params` names ("ctx", "ctx,
    next", "" for none), positionally. Sync or async alike."""
    if not callable(function):
        raise TypeError(f"{what} {describe(function)} is not callable: a {what} is a function of ({params})")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # some builtins have no signature to check: their first call will tell
    count = len(params.split(",")) if params else 0
    try:
        signature.bind(*range(count))
    except TypeError as exc:
        raise TypeError(
            f"{what} {describe(function)} takes {signature}, but is called with ({params}): {exc}"
        ) from None


def _is_async(function: Any) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(type(function).__call__)


def check_async(function: Any, what: str, params: str) -> None:
    """Like `check_callable`, and `function` must be an `async def` (or an object whose `__call__` is):
    its result is awaited."""
    check_callable(function, what, params)
    if not _is_async(function):
        raise TypeError(
            f"{what} {describe(function)} is a plain def: a {what} must be an `async def` taking ({params})"
        )


def check_plain(function: Any, what: str, params: str) -> None:
    """Like `check_callable`, and `function` must not be an `async def`: its result is used as it is."""
    check_callable(function, what, params)
    if _is_async(function):
        raise TypeError(
            f"{what} {describe(function)} is an async def: a {what} is a plain def taking ({params}), "
            "since its result is used as it is, not awaited"
        )
