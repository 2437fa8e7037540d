"""The root of the framework's exceptions: `except bot.BotError` catches every one of them.

Each exception lives beside the code that raises it (`StorageUnavailable` in bot/storage, `BotApiError`
in bot/telegram.py, `ConfigError` in bot/config.py, ...) and derives from `BotError`, as aiogram's derive
from `AiogramError`. A new one does too: tests/test_errors.py fails for any exception class defined in
`bot` that does not, except the framework's own control flow (`ControlFlow`), which is no error and
never leaves the framework.
"""

from __future__ import annotations

__all__ = ["BotError", "ControlFlow"]


class BotError(Exception):
    """Raised by the framework (never by an app's own code, unless it chooses to)."""


class ControlFlow(BaseException):
    """Not an error: how the framework steers an update through an app's code, e.g. an optimistic attempt
    giving way (`bot.storage.Conflict`) so that the pipeline runs the update again.

    Derived from BaseException, as asyncio.CancelledError is, so that it passes an app's `except
    Exception` (in a middleware, a handler, the error hook) untouched on its way back to the pipeline,
    which always catches it: an app never sees it, and never swallows it by accident."""
