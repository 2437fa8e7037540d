"""bot/__init__.py: what an app needs comes from `bot` itself, and the apps shipped here use only that."""

from __future__ import annotations

import ast
from pathlib import Path

import bot

ROOT = Path(__file__).resolve().parent.parent


def test_every_name_in_all_is_importable_and_all_is_sorted() -> None:
    for name in bot.__all__:
        assert getattr(bot, name) is not None
    assert bot.__all__ == sorted(bot.__all__, key=lambda n: (not n[0].isupper(), n))
    assert {"Bot", "Router", "Context", "session", "BotError", "SkipHandler"} <= set(bot.__all__)


def framework_imports(path: Path) -> set[str]:
    """The `bot…` modules a file imports names from (the test kit and the bundled apps aside)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            if top == "bot" and not node.module.startswith(("bot.testing", "bot.apps")):
                found.add(node.module)
    return found


def test_the_bundled_apps_import_only_from_the_front_door() -> None:
    """`bot` for the framework, `bot.types` for the Bot API's types (as aiogram's `aiogram.types`)."""
    for app in (
        ROOT / "bot" / "apps" / "pizza.py",
        ROOT / "examples" / "todo.py",
        ROOT / "examples" / "remind.py",
    ):
        assert framework_imports(app) <= {"bot", "bot.types"}, app
        assert "bot" in framework_imports(app), app
