"""Apps are loaded by name (`--app module:factory`), as uvicorn loads an ASGI app."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.dispatch import Bot
from bot.importer import AppError, load_app


def test_an_app_is_a_factory_or_a_bot() -> None:
    assert isinstance(load_app("bot.apps.pizza:build_bot"), Bot)
    assert isinstance(load_app("examples.todo:build_bot"), Bot)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("bot.apps.pizza", "expected module:factory"),
        ("no_such_module:app", "no module named 'no_such_module'"),
        ("bot.apps.pizza:missing", "has no attribute 'missing'"),
        ("bot.apps.pizza:PizzaSession", "gave a PizzaSession, not a bot.Bot"),
    ],
)
def test_an_app_that_cannot_load_says_why(reference: str, message: str) -> None:
    with pytest.raises(AppError, match=re.escape(message)):
        load_app(reference)


def test_an_import_error_inside_the_app_is_its_own_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_app.py").write_text("import not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="not_installed_dependency"):
        load_app("broken_app:build_bot")
