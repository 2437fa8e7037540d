"""CPU time of the bot process per update, for two checkouts, in alternating rounds.

    .venv/bin/python bench/cpu_per_update.py /path/to/main /path/to/branch --rounds 6
    .venv/bin/python bench/cpu_per_update.py . .+LOG_LEVEL=INFO --rounds 6     # one checkout, two settings
    .venv/bin/python bench/cpu_per_update.py . .+APP=two_sessions:build_bot -w T  # the two-session bot

Wall-clock throughput on a shared machine moves with everyone else's load; the CPU seconds the bot
process itself spends per update move far less, so a change to the request path shows up here first.
Each round starts a fresh `python -m bot serve` from each checkout (run from a directory without a `bot`
package, so PYTHONPATH decides which code runs, with the checkout's bench/apps: `APP=two_sessions:build_bot`
serves the benchmark's two-session bot) on its own fresh database, and delivers 6,000 updates over 600
chats, half with 🍕, each chat with two senders of its own (bench/workloads.py's `sender`), in workload A's
shape (shuffled, 32 in flight) or T's (`-w T`: each chat's in order, one at a time, 40 in flight).
Loopback only, fixed counts. The bot runs with the test kit's settings (`LOG_LEVEL=WARNING`) and
`DB_POOL_MAX=16`; `DIR+NAME=VALUE+…` sets more.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
from pathlib import Path

from checkouts import checkout_env, migrate, resolved
from databases import create_database
from workloads import sender

from bot.apps.pizza_testing import PIZZA
from bot.embedded import EmbeddedPostgres
from bot.testing.delivery import LoopbackHttp, deliver
from bot.testing.env import SECRET, bot_env
from bot.testing.fake_telegram import FakeTelegram, serve
from bot.testing.processes import BotProcess
from bot.testing.updates import message_update
from bot.types import Update

UPDATES = 6000
CHATS = 600


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_updates(workload: str) -> list[Update]:
    rng = random.Random(1)
    updates = [
        message_update(
            chat * (UPDATES // CHATS) + n + 1,
            -100_000 - chat,
            PIZZA if rng.random() < 0.5 else "hi",
            from_id=sender(chat, n),
        )
        for chat in range(CHATS)
        for n in range(UPDATES // CHATS)
    ]
    if workload == "A":
        rng.shuffle(updates)
    return updates


async def one_round(spec: str, workload: str, pg: EmbeddedPostgres, api_root: str, logs: Path) -> float:
    """Microseconds of bot CPU per update, serving the code in `spec`'s checkout with its settings."""
    dsn = await create_database(pg.dsn("postgres"), "cpu")
    env = checkout_env(spec, {**bot_env(dsn, api_root), "DB_POOL_MAX": "16", "LOG_LEVEL": "WARNING"})
    await migrate(env)
    updates = make_updates(workload)
    with BotProcess(env, logs / f"{dsn.rsplit('/', 1)[-1]}.log") as bot:
        bot.wait_ready()
        client = LoopbackHttp()
        before = cpu_seconds(bot.proc.pid)
        await deliver(
            client,
            lambda: bot.url + "/webhook",
            SECRET,
            updates,
            in_flight=32 if workload == "A" else 40,
            one_per_chat=workload == "T",
        )
        spent = cpu_seconds(bot.proc.pid) - before
        await client.aclose()
    return spent / UPDATES * 1e6


async def compare(trees: list[str], workload: str, rounds: int, logs: Path) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {tree: [] for tree in trees}
    pg = EmbeddedPostgres.throwaway()
    try:
        with serve(FakeTelegram()) as api_root:
            for n in range(rounds):
                for tree in trees if n % 2 == 0 else trees[::-1]:
                    us = await one_round(tree, workload, pg, api_root, logs)
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
    parser.add_argument("-w", "--workload", choices=["A", "T"], default="A", help="the updates' shape")
    args = parser.parse_args()
    trees = [resolved(spec) for spec in args.trees]
    logs = Path(tempfile.mkdtemp())
    os.chdir(logs)  # `python -m bot` must find the checkouts through PYTHONPATH only
    for tree, values in asyncio.run(compare(trees, args.workload, args.rounds, logs)).items():
        print(f"{tree}: median {statistics.median(values):.1f} µs CPU/update over {len(values)} rounds")


if __name__ == "__main__":
    main()
