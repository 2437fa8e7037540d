"""Writes the Bot API's types and methods from the vendored description of it (`api.json`, see README.md).

    python -m bot._gen.generate          # rewrite bot/types.py, bot/methods.py, bot/kinds.py
    python -m bot._gen.generate --check  # exit 1 if any of them differs from what it would write

Three outputs, each for one kind of reader:
- `bot/types.py`: every type, as a frozen msgspec Struct. Unions the API tags by a field ("always
  “user”", "must be emoji") become msgspec tagged unions on that field; the tag is a class constant.
- `bot/methods.py`: every method's parameters as a TypedDict, and two mixins that spell every method
  by its snake_case name: `ApiMethods` (awaited now, the result decoded into the types) and
  `OutboxMethods` (queued, sent after the update's commit).
- `bot/kinds.py`: the update kinds (Update's fields), a handler decorator for each (`Router`) and an
  accessor for each (`Context`).

Names stay the Bot API's, in snake_case for methods; the one field name Python cannot have, `from`, is
`from_user` (and still `from` in JSON).

The generator's parts: `schema` reads api.json, `source` writes Python text, and `render_types`,
`render_methods` and `render_kinds` each write one module; this module writes them all (through ruff
format) or checks them.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from .render_kinds import render_kinds
from .render_methods import render_methods
from .render_types import render_types
from .schema import ARRAY, SCHEMA, Schema, find_tags, load
from .source import snake

# ARRAY, find_tags and snake: what tests/test_types.py builds its own expectations from.
__all__ = ["ARRAY", "Schema", "find_tags", "load", "main", "render", "snake"]

PACKAGE = SCHEMA.parent.parent  # bot/


def render(schema: Schema) -> dict[Path, str]:
    """Every generated file's path and text, laid out by ruff format as the rest of the code is."""
    texts = {
        PACKAGE / "types.py": render_types(schema),
        PACKAGE / "methods.py": render_methods(schema),
        PACKAGE / "kinds.py": render_kinds(schema),
    }
    return {path: ruff_format(path, text) for path, text in texts.items()}


def ruff_format(path: Path, text: str) -> str:
    """Leave the layout of long lines to the project's formatter (a test dependency, as the generator is
    a developer's tool), with the project's settings."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        raise SystemExit("the generator needs ruff: pip install -e '.[test]'")
    command = [ruff, "format", "--stdin-filename", str(path), "-"]
    return subprocess.run(command, input=text, capture_output=True, text=True, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot._gen.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    args = parser.parse_args(argv)
    stale = []
    for path, text in render(load()).items():
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    verb = "out of date" if args.check else "written"
    for path in stale:
        print(f"{path.relative_to(PACKAGE.parent)}: {verb}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
