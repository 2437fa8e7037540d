"""bot/errors.py: every exception the framework defines derives from BotError."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from bot.errors import BotError, ControlFlow

PACKAGE = Path(__file__).resolve().parent.parent / "bot"

# Exceptions that are deliberately not the framework's: each with the reason.
NOT_OURS = {
    "bot.testing.conformance_tools.Boom": "stands for a bug in an app's own code, which the checks provoke",
}


def exceptions_defined_in_bot() -> dict[str, type[BaseException]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue  # runs the command line
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == name:
                found[f"{name}.{attribute}"] = value
    return found


def test_every_exception_of_the_framework_derives_from_bot_error() -> None:
    found = exceptions_defined_in_bot()
    assert "bot.storage.StorageUnavailable" in found and "bot.config.ConfigError" in found  # the walk works
    strays = sorted(
        name
        for name, cls in found.items()
        if not issubclass(cls, (BotError, ControlFlow)) and name not in NOT_OURS
    )
    assert strays == [], f"derive these from bot.errors.BotError: {strays}"
    assert set(NOT_OURS) <= set(found)  # no stale exemption


def test_value_errors_stay_value_errors() -> None:
    """Re-parented, not re-typed: code that caught ValueError still catches these."""
    from bot.config import ConfigError
    from bot.rules import ImplausibleMigration
    from bot.telegram import InvalidUpdate

    for cls in (ConfigError, InvalidUpdate, ImplausibleMigration):
        assert issubclass(cls, ValueError) and issubclass(cls, BotError)


def test_the_framework_s_control_flow_is_no_exception_an_app_could_catch() -> None:
    """An optimistic attempt giving way passes an app's `except Exception` on its way to the pipeline."""
    from bot.storage import Conflict, StaleRead

    for cls in (ControlFlow, Conflict, StaleRead):
        assert issubclass(cls, BaseException) and not issubclass(cls, Exception)
    assert not issubclass(ControlFlow, BotError)
