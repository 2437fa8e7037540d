"""The README is the settings' reference: every variable the package reads is in it, every variable its
Configuration table lists is read, and the local trial's banner it shows is the one `serve` prints."""

from __future__ import annotations

import re
from pathlib import Path

from bot.config import load_settings
from bot.playground.banner import trial_banner

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# `env.get("X"`, `os.environ.get("X"`, `os.environ["X"]`, and config.py's `_int(env, "X", …)` and kin.
READ = re.compile(r'(?:environ|env)(?:\.get\(|\[)"([A-Z][A-Z0-9_]+)"|\(env, "([A-Z][A-Z0-9_]+)"')


def variables_read() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted((ROOT / "bot").rglob("*.py")):
        for match in READ.finditer(path.read_text()):
            found.setdefault(match.group(1) or match.group(2), path.relative_to(ROOT))
    return found


def configuration_table() -> set[str]:
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = (line.split("|")[1] for line in section.splitlines() if line.startswith("| `"))
    return {name for cell in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell)}


def test_the_readme_and_the_package_name_the_same_variables() -> None:
    read = variables_read()
    assert {"BOT_TOKEN", "DATABASE_URL", "PORT", "DB_POOL_MAX", "WEB_CONCURRENCY_SET_BY"} <= set(read)
    missing = {name: str(path) for name, path in read.items() if f"`{name}`" not in README}
    assert not missing, f"read but not in README.md: {missing}"
    table = configuration_table()
    assert len(table) > 40
    assert not table - set(read), "in README.md's Configuration table but never read"


def test_the_readme_shows_the_banner_serve_prints() -> None:
    after = README.split("`serve` without a token prints where to look:\n\n```text\n", 1)[1]
    shown = after.split("```", 1)[0]
    database = "embedded PostgreSQL, data in /home/you/.local/share/pizza-bot/postgres"
    assert shown.strip("\n") == trial_banner(load_settings({}), "127.0.0.1", 8000, database).strip("\n")
