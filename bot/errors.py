"""The root of the framework's exceptions: `except bot.BotError` catches every one of them.

Each exception lives beside the code that raises it (`StorageUnavailable` in bot/storage, `BotApiError`
in bot/telegram.py, `ConfigError` in bot/config.py, ...) and derives from `BotError`, as aiogram's derive
from `AiogramError`. A new one does too: tests/test_errors.py fails for any exception class defined in
`bot` that does not.
"""

from __future__ import annotations

__all__ = ["BotError"]


class BotError(Exception):
    """Raised by the framework (never by an app's own code, unless it chooses to)."""
