"""Loading the app to run from its `module:factory` name, as uvicorn loads an ASGI app.

The framework never imports an app itself: `serve`, `poll` and `set-webhook` are told which one to run
(`--app`, or the APP setting), the way uvicorn is handed a Starlette app.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .dispatch import Bot
from .errors import BotError

__all__ = ["AppError", "load_app"]


class AppError(BotError):
    """The app cannot be loaded; the message says which and why, in one line."""


def load_app(reference: str) -> Bot[Any]:
    """`module:attribute`, where the attribute is a Bot or a function of no arguments returning one.

    The current folder is importable, as with `python -m` and uvicorn, so `--app examples.todo:build_bot`
    works from a checkout without installing the examples.
    """
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise AppError(f"{reference!r}: expected module:factory, like mybot.main:build_bot")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise AppError(f"{reference!r}: no module named {exc.name!r}") from exc
        raise  # the app's own import failed: its traceback is the useful answer
    target = getattr(module, attribute, None)
    if target is None:
        raise AppError(f"{reference!r}: module {module_name!r} has no attribute {attribute!r}")
    app = target() if callable(target) and not isinstance(target, Bot) else target
    if not isinstance(app, Bot):
        raise AppError(f"{reference!r}: gave a {type(app).__name__}, not a bot.Bot")
    return app
