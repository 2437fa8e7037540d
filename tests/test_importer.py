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


@pytest.mark.parametrize("layout", ["bot.py", "bot/__init__.py"])
def test_an_app_named_like_the_framework_is_refused_saying_why(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / layout).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / layout).write_text("def build_bot(): ...\n")
    monkeypatch.chdir(tmp_path)
    shadow = tmp_path / layout.split("/")[0]
    with pytest.raises(AppError, match=re.escape(f"{shadow} has the name of the framework's package")):
        load_app("bot:build_bot")
    with pytest.raises(AppError, match="rename it, say to mybot"):
        load_app("bot.main:build_bot")
    assert isinstance(load_app("bot.apps.pizza:build_bot"), Bot)  # the framework's own apps still load


def test_the_checkout_itself_is_not_taken_for_a_shadow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # bot/ here is the framework
    with pytest.raises(AppError, match="has no attribute 'build_bot'"):
        load_app("bot:build_bot")
