"""CPU time of the bot process per update, for two checkouts, in alternating rounds.

    .venv/bin/python bench/cpu_per_update.py /path/to/main /path/to/branch --rounds 6
    .venv/bin/python bench/cpu_per_update.py . .+LOG_LEVEL=INFO --rounds 6     # one checkout, two settings

Wall-clock throughput on a shared machine moves with everyone else's load; the CPU seconds the bot
process itself spends per update move far less, so a change to the request path shows up here first.
Each round starts a fresh `python -m bot serve` from each checkout (run from a directory without a `bot`
package, so PYTHONPATH decides which code runs) on its own fresh database, and delivers workload A's
shape: 6,000 updates over 600 chats, half with 🍕, 32 in flight. Loopback only, fixed counts. The bot
runs with the test kit's settings (`LOG_LEVEL=WARNING`) and `DB_POOL_MAX=16`; `DIR+NAME=VALUE+…` sets more.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import asyncpg

from bot.apps.pizza_testing import PIZZA
from bot.embedded import EmbeddedPostgres
from bot.testing.delivery import LoopbackHttp, deliver
from bot.testing.env import SECRET, bot_env
from bot.testing.fake_telegram import FakeTelegram, serve
from bot.testing.processes import BotProcess
from bot.testing.updates import message_update

UPDATES = 6000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_round(spec: str, pg: EmbeddedPostgres, api_root: str, logs: Path) -> float:
    """Microseconds of bot CPU per update, serving the code in `spec`'s checkout with its settings."""
    tree, *settings = spec.split("+")
    name = f"cpu_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg.dsn("postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    env = {**bot_env(pg.dsn(name), api_root), "PYTHONPATH": tree, "DB_POOL_MAX": "16", "LOG_LEVEL": "WARNING"}
    env.update(setting.split("=", 1) for setting in settings)
    migrate = [sys.executable, "-m", "bot", "migrate"]
    await asyncio.to_thread(
        subprocess.run, migrate, env={**os.environ, **env}, check=True, capture_output=True
    )
    rng = random.Random(1)
    updates = [
        message_update(i + 1, -100_000 - i % 600, PIZZA if rng.random() < 0.5 else "hi")
        for i in range(UPDATES)
    ]
    with BotProcess(env, logs / f"{name}.log") as bot:
        bot.wait_ready()
        client = LoopbackHttp()
        before = cpu_seconds(bot.proc.pid)
        await deliver(client, lambda: bot.url + "/webhook", SECRET, updates, in_flight=32)
        spent = cpu_seconds(bot.proc.pid) - before
        await client.aclose()
    return spent / UPDATES * 1e6


async def compare(trees: list[str], rounds: int, logs: Path) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {tree: [] for tree in trees}
    pg = EmbeddedPostgres.throwaway()
    try:
        with serve(FakeTelegram()) as api_root:
            for n in range(rounds):
                for tree in trees if n % 2 == 0 else trees[::-1]:
                    us = await one_round(tree, pg, api_root, logs)
                    results[tree].append(us)
                    print(f"{tree}: {us:.0f} µs CPU/update", flush=True)
    finally:
        pg.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "trees", nargs=2, help="two checkouts to compare (their root folders, each DIR or DIR+NAME=VALUE+...)"
    )
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    trees = [
        "+".join([str(Path(tree).resolve()), *settings])
        for tree, *settings in (t.split("+") for t in args.trees)
    ]
    logs = Path(tempfile.mkdtemp())
    os.chdir(logs)  # `python -m bot` must find the checkouts through PYTHONPATH only
    for tree, values in asyncio.run(compare(trees, args.rounds, logs)).items():
        print(f"{tree}: median {statistics.median(values):.1f} µs CPU/update over {len(values)} rounds")


if __name__ == "__main__":
    main()
