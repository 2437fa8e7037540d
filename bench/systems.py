"""The systems a row measures, and how each is started: our bot and the two-session bot (`bot`, `bot2`), from
another checkout (`bot@DIR`) and with settings (`bot+NAME=VALUE`), as deployed (the checkout's Procfile);
grammY under Node. The raw asyncpg loop runs in the benchmark's own process (bench/raw_loop.py)."""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import load_settings
from bot.migrate import migrate
from bot.testing.env import bot_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APPS = HERE / "apps"  # the benchmark's own bots, put on PYTHONPATH
GRAMMY = Path(__file__).parent / "grammy"
# Interpreters with what a deploy installs, one per pyproject.toml, kept between runs.
DEPLOYED = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "telegram-webhook-sessions-bench"
)


@dataclass(frozen=True)
class System:
    """What a row measures. On the command line: `bot` (the pizza bot), `bot2` (the two-session bot,
    bench/apps/two_sessions.py), either as `bot@DIR` (the code of another checkout, to compare old and
    new in one run) and with settings (`bot+NAME=VALUE+...`, `bot@DIR+NAME=VALUE`), `grammy`, `raw`, `raw2`
    (the raw loop doing the two-session bot's work)."""

    kind: str
    env: tuple[tuple[str, str], ...] = ()
    checkout: Path | None = None

    @classmethod
    def parse(cls, text: str) -> System:
        head, *settings = text.strip().split("+")
        kind, _, where = head.partition("@")
        ours = kind in ("bot", "bot2")
        if kind not in ("bot", "bot2", "grammy", "raw", "raw2") or ((settings or where) and not ours):
            raise ValueError(
                f"unknown system {text!r}: bot, bot2, bot@DIR, bot+NAME=VALUE..., grammy, raw or raw2"
            )
        checkout = Path(where).resolve() if where else None
        if checkout is not None and not (checkout / "bot" / "__init__.py").is_file():
            raise ValueError(f"{text!r}: {checkout} is not a checkout of this project (no bot/__init__.py)")
        return cls(kind, tuple(tuple(s.split("=", 1)) for s in settings), checkout)  # type: ignore[misc]

    @property
    def label(self) -> str:
        names = {
            "bot": "this bot",
            "bot2": "two sessions",
            "grammy": "grammY + pg.Pool",
            "raw": "raw asyncpg",
            "raw2": "raw asyncpg, two sessions",
        }
        where = [f"@{self.checkout.name}"] if self.checkout is not None else []
        return " ".join([names[self.kind], *where, *(f"{k}={v}" for k, v in self.env)])


def procfile_command(checkout: Path, python: str, role: str) -> list[str]:
    """The Procfile's command for `role` (web, release) in that checkout, run by `python`."""
    for line in (checkout / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == role:
            words = shlex.split(command)
            break
    else:
        raise RuntimeError(f"{checkout / 'Procfile'} has no {role}: line")
    if words[0] in ("python", "python3"):
        words[0] = python
    return words


def web_command(checkout: Path, python: str, app: str | None) -> list[str]:
    """The Procfile's `web:` command of that checkout, run by `python`, listening on loopback only (a
    PaaS listens on all interfaces; the benchmark keeps to 127.0.0.1), with `--app` when not the pizza bot."""
    words = procfile_command(checkout, python, "web")
    if "--host" in words:
        words[words.index("--host") + 1] = "127.0.0.1"
    return words + (["--app", app] if app else [])


def deployed_env(dsn: str, root: str) -> dict[str, str]:
    """What a user sets (bot_env's test-only OUTBOX_SWEEP_INTERVAL left out): everything else is a default,
    but for the bot's send rate, which only the check at the end uses (no update of a workload gets a
    reply): at the default 30/s, answering 1,000 chats' /hunger would take half a minute per row."""
    env = {k: v for k, v in bot_env(dsn, root).items() if k != "OUTBOX_SWEEP_INTERVAL"}
    return env | {"SEND_RATE_GLOBAL": "1000"}


def bot_settings() -> set[str]:
    """The names of the environment variables the bot reads (asked of a recording mapping)."""

    asked: set[str] = set()

    class Recording(dict[str, str]):
        def get(self, key: str, default: Any = None) -> Any:
            asked.add(key)
            return super().get(key, default)

    env = Recording(bot_env("postgresql://u@127.0.0.1/db", "http://127.0.0.1:1"))
    load_settings(env)
    return asked


def grammy_ready() -> str | None:
    """None when the grammY bot can run; else why not (it is then left out, with that message)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not found: the grammY comparison is skipped"
    if not (GRAMMY / "node_modules").is_dir():
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=GRAMMY, capture_output=True, text=True
        )
        if done.returncode != 0:
            return (
                f"`npm ci` in {GRAMMY} failed, the grammY comparison is skipped: {done.stderr.strip()[-500:]}"
            )
    return None


@functools.cache
def deployed_python() -> str:
    """An interpreter with what a deploy installs (`pip install .`: the dependencies, none of the test
    extras), made on first use (about half a minute) and kept for this pyproject.toml. The bench's own
    interpreter has the test extras, and they change what the server loads and how much memory it
    takes: selenium brings trio, which httpcore then imports, and pytest brings pygments, which httpx
    imports for its command line (4 MB resident at start that a deployed bot does not have:
    bench/README.md). The checkout's code still comes first on PYTHONPATH: the package installed here
    is only how its dependencies are resolved."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = DEPLOYED / f"venv-{digest}"
    python = venv / "bin" / "python"
    if not python.is_file():
        print(f"installing the deployed dependencies in {venv} (once)", file=sys.stderr, flush=True)
        building = DEPLOYED / f"building-{uuid.uuid4().hex[:6]}"  # renamed when complete: never half made
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
        subprocess.run(
            [str(building / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT)], check=True
        )
        shutil.rmtree(venv, ignore_errors=True)
        building.rename(venv)
    return str(python)


def checkout_of(system: System) -> tuple[Path, str]:
    """Where one of our systems runs from, and its interpreter: the checkout's .venv when it has one, else
    one with a deploy's dependencies (`deployed_python`)."""
    cwd = system.checkout or ROOT
    venv = cwd / ".venv" / "bin" / "python"
    return cwd, str(venv) if system.checkout is not None and venv.is_file() else deployed_python()


def checkout_path(cwd: Path, env: Mapping[str, str]) -> str:
    """PYTHONPATH: the checkout's own code first, whatever this interpreter has installed; the bench's bots
    after. (A PYTHONPATH given as a setting comes after: e.g. a sitecustomize.py probing the server.)"""
    return os.pathsep.join([str(cwd), str(APPS), *filter(None, [env.get("PYTHONPATH")])])


def release(system: System, dsn: str, root: str, logs: Path) -> None:
    """Migrate an empty database as a deploy does: the system's checkout's Procfile `release:` command, so
    an old checkout's database holds its own migrations only (it refuses to start on a newer schema)."""
    cwd, python = checkout_of(system)
    env = {**os.environ, **deployed_env(dsn, root), **dict(system.env)}
    env["PYTHONPATH"] = checkout_path(cwd, env)
    done = subprocess.run(
        procfile_command(cwd, python, "release"), env=env, cwd=cwd, capture_output=True, text=True
    )
    (logs / f"release-{uuid.uuid4().hex[:6]}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{system.label}: release failed:\n{(done.stdout + done.stderr)[-2000:]}")


async def migrate_for(system: System, dsn: str, root: str, logs: Path) -> None:
    """Migrate a row's empty database with the code that runs on it: ours by their checkout's release
    command, grammY's and the raw loop's by this checkout's code."""
    if system.kind in ("bot", "bot2"):
        release(system, dsn, root, logs)
    else:
        await migrate(dsn)


def server(system: System, dsn: str, root: str) -> tuple[list[str], dict[str, str], Path | None]:
    """How a server system starts: its command, environment and working directory (None: this one)."""
    env = deployed_env(dsn, root) | dict(system.env)
    if system.kind == "grammy":
        return ["node", str(GRAMMY / "bot.js")], env, None
    cwd, python = checkout_of(system)
    app = "two_sessions:build_bot" if system.kind == "bot2" else None
    env["PYTHONPATH"] = checkout_path(cwd, env)
    return web_command(cwd, python, app), env, cwd
