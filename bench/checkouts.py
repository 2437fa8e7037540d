"""What bench/cpu_per_update.py and bench/instructions.py share: a bot process of a given checkout, with
given settings, on a new database of its own (bench/databases.py), migrated by that checkout's code.

A spec is `DIR` or `DIR+NAME=VALUE+…`: the checkout's root (its code first on PYTHONPATH, with its
bench/apps, so `+APP=two_sessions:build_bot` serves the two-session bot) and settings over `base`. The
scripts run from a directory without a `bot` package, so PYTHONPATH alone decides which code runs.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

__all__ = ["checkout_env", "migrate", "resolved"]


def resolved(spec: str) -> str:
    """The spec with its checkout's path made absolute (the scripts change directory)."""
    tree, *settings = spec.split("+")
    return "+".join([str(Path(tree).resolve()), *settings])


def checkout_env(spec: str, base: dict[str, str]) -> dict[str, str]:
    """The bot process's environment for `spec`: `base`, the checkout on PYTHONPATH, then its settings."""
    tree, *settings = spec.split("+")
    env = {**base, "PYTHONPATH": os.pathsep.join([tree, str(Path(tree) / "bench" / "apps")])}
    for setting in settings:
        name, _, value = setting.partition("=")
        env[name] = value
    return env


async def migrate(env: dict[str, str]) -> None:
    """Migrate env's DATABASE_URL with the code env runs (`python -m bot migrate`), as a deploy does."""
    command = (sys.executable, "-m", "bot", "migrate")
    done = await asyncio.create_subprocess_exec(
        *command, env={**os.environ, **env}, stdout=asyncio.subprocess.DEVNULL
    )
    if await done.wait() != 0:
        raise RuntimeError(f"migrating with {env['PYTHONPATH']} failed")
