"""Apps are loaded by name, and the framework stays free of them: no import, no pizza."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from bot.dispatch import Bot
from bot.importer import AppError, load_app

ROOT = Path(__file__).parent.parent
FRAMEWORK = sorted(p for p in (ROOT / "bot").rglob("*.py") if "apps" not in p.relative_to(ROOT / "bot").parts)
APPS = ("bot.apps", "examples")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against its package."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_walk_sees_the_framework_and_resolves_relative_imports() -> None:
    assert len(FRAMEWORK) > 20
    assert "bot.dispatch.Bot" in imported_modules(ROOT / "bot" / "runtime.py")
    assert "bot.storage.PendingCall" in imported_modules(ROOT / "bot" / "storage" / "memory.py")
    assert {"bot.apps", "bot.apps.pizza"} & imported_modules(ROOT / "tests" / "test_pizza.py")


@pytest.mark.parametrize("path", FRAMEWORK, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_framework_module_imports_an_app(path: Path) -> None:
    apps = {m for m in imported_modules(path) if m == APPS[1] or m.startswith(tuple(a + "." for a in APPS))}
    assert apps == set()


@pytest.mark.parametrize("path", FRAMEWORK, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_framework_module_speaks_of_pizza(path: Path) -> None:
    # One exception: config names the default app, as a string.
    lines = [
        line
        for line in path.read_text().splitlines()
        if re.search(r"pizza|hunger|🍕|\\N\{SLICE OF PIZZA\}", line, re.IGNORECASE)
        and not line.startswith("DEFAULT_APP = ")
    ]
    assert lines == []


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
