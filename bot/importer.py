"""Loading the app to run from its `module:factory` name, as uvicorn loads an ASGI app.

The framework never imports an app itself: `serve`, `poll` and `set-webhook` are told which one to run
(`--app`, or the APP setting), the way uvicorn is handed a Starlette app.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from .dispatch import Bot
from .errors import BotError

__all__ = ["AppError", "load_app"]


class AppError(BotError):
    """The app cannot be loaded; the message says which and why, in one line."""


def _named_like_the_framework(module_name: str) -> Path | None:
    """The user's own `bot.py` (or `bot` package) in the current folder, when `module_name` can only mean
    it: `bot` itself, or a `bot.…` module the framework does not have. The framework is imported as `bot`
    already, so that file can never be imported under its name."""
    if module_name.split(".")[0] != __package__:
        return None
    here = Path.cwd()
    module, package = here / f"{__package__}.py", here / __package__
    if module.is_file():
        shadow = module
    elif (package / "__init__.py").is_file() and package.resolve() != Path(__file__).resolve().parent:
        shadow = package
    else:
        return None
    try:
        ours = module_name != __package__ and importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:  # a parent of it is missing
        ours = False
    return None if ours else shadow


def load_app(reference: str) -> Bot[Any]:
    """`module:attribute`, where the attribute is a Bot or a function of no arguments returning one.

    The current folder is importable, as with `python -m` and uvicorn, so `--app examples.todo:build_bot`
    works from a checkout without installing the examples.
    """
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise AppError(f"{reference!r}: expected module:factory, like mybot.main:build_bot")
    shadow = _named_like_the_framework(module_name)
    if shadow is not None:
        raise AppError(
            f"{reference!r}: {shadow} has the name of the framework's package, `bot`, so `import bot` finds"
            f" the framework, not it (and `python -m bot` run in {shadow.parent} would run it instead of"
            f" the framework): rename it, say to mybot{shadow.suffix}, and use --app mybot:{attribute}"
        )
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
