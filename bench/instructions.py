"""Instructions the bot process executes per update, for two checkouts: a measure that does not move with
the machine's load.

    .venv/bin/python bench/instructions.py /path/to/main /path/to/branch
    .venv/bin/python bench/instructions.py /path/to/main /path/to/branch --in-flight 32
    .venv/bin/python bench/instructions.py . .+APP=two_sessions:build_bot -w T   # the two-session bot

CPU seconds per update (bench/cpu_per_update.py) move by 15-25% from one round to the next on a shared
machine, more than most changes to the request path; the instructions a process executes move by about
0.3%. Each checkout's `python -m bot serve` runs under valgrind's cachegrind (Debian's `valgrind`; about
50 times slower) twice, on a fresh database each time, and is delivered 300 updates, then 1,300 (half
with 🍕, over 300 chats, LOG_LEVEL=WARNING, PYTHONHASHSEED=0), over HTTP on loopback; the difference of
the two counts over 1,000 is one update's instructions, start-up and shutdown cancelled out. Run from a
directory without a `bot` package, so PYTHONPATH decides which code runs (with the checkout's bench/apps:
`DIR+APP=two_sessions:build_bot` serves the two-session bot; `DIR+NAME=VALUE+…` sets any setting). `-w T`
delivers workload T's shape instead: each chat's ten updates in order, from two senders of its own. What it does not count: the
kernel's side of the system calls, and any other process (PostgreSQL, the client). Run one at a time:
with another valgrind run beside it, a count moved by up to 1.5% (the timing changes how the event loop
batches its work).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import sys
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

FEW, MANY = 300, 1300
CHATS = 300


def make_updates(count: int, workload: str) -> list[Update]:
    """`count` updates, half with 🍕: over CHATS chats in turn, or (T) each chat's ten in order."""
    rng = random.Random(1)
    if workload == "T":
        return [
            message_update(
                n + 1,
                -100_000 - n // 10,
                f"{PIZZA} please" if rng.random() < 0.5 else "hi all",
                from_id=sender(n // 10, n % 10),  # T's: each chat's own two
            )
            for n in range(count)
        ]
    return [
        message_update(n + 1, -100_000 - n % CHATS, f"{PIZZA} please" if rng.random() < 0.5 else "hi all")
        for n in range(count)
    ]


async def instructions(
    spec: str, updates: list[Update], in_flight: int, pg: EmbeddedPostgres, api_root: str
) -> int:
    """Instructions of a bot process serving the code in `spec`'s checkout, with its settings, that was
    delivered `updates`."""
    dsn = await create_database(pg.dsn("postgres"), "ir")
    env = checkout_env(
        spec,
        {
            **bot_env(dsn, api_root),
            "LOG_LEVEL": "WARNING",
            "PYTHONHASHSEED": "0",  # the same hashes, so the same dict and set layouts, in every run
            # The periodic work (the outbox's sweep, the webhook's watch) would count with the run's
            # length, which the longer run has more of: none during it.
            "OUTBOX_SWEEP_INTERVAL": "3600",
            "WEBHOOK_WATCH_INTERVAL": "3600",
        },
    )
    await migrate(env)
    logs = Path(tempfile.mkdtemp())
    counts = logs / "cachegrind.txt"
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--branch-sim=no",
        "--cachegrind-out-file=/dev/null",
        f"--log-file={counts}",
        sys.executable,
        "-m",
        "bot",
        "serve",
    ]
    with BotProcess(env, logs / "bot.log", command=command) as bot:
        await asyncio.to_thread(bot.wait_ready, 600)
        client = LoopbackHttp()
        try:
            await deliver(
                client, lambda: bot.url + "/webhook", SECRET, updates, in_flight=in_flight, one_per_chat=True
            )
        finally:
            await client.aclose()
        await asyncio.to_thread(bot.terminate, 600)  # (cachegrind writes its count as the process ends)
    found = re.search(r"I\s+refs:\s+([\d,]+)", counts.read_text())
    if found is None:
        raise RuntimeError(f"no instruction count in {counts}")
    return int(found.group(1).replace(",", ""))


async def per_update(trees: list[str], workload: str, in_flight: int) -> dict[str, float]:
    pg = EmbeddedPostgres.throwaway()
    try:
        with serve(FakeTelegram()) as api_root:
            results = {}
            for tree in trees:
                few = await instructions(tree, make_updates(FEW, workload), in_flight, pg, api_root)
                many = await instructions(tree, make_updates(MANY, workload), in_flight, pg, api_root)
                results[tree] = (many - few) / (MANY - FEW)
                print(f"{tree}: {results[tree]:,.0f} instructions/update", flush=True)
            return results
    finally:
        pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "trees", nargs=2, help="two checkouts to compare (their root folders, each DIR or DIR+NAME=VALUE+...)"
    )
    parser.add_argument("--in-flight", type=int, default=1, help="updates delivered at once (default 1)")
    parser.add_argument("-w", "--workload", choices=["A", "T"], default="A", help="the updates' shape")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    trees = [resolved(spec) for spec in args.trees]
    os.chdir(tempfile.mkdtemp())  # `python -m bot` must find the checkouts through PYTHONPATH only
    results = asyncio.run(per_update(trees, args.workload, args.in_flight))
    old, new = results[trees[0]], results[trees[1]]
    print(f"{new - old:+,.0f} instructions/update ({(new - old) / old:+.1%})")


if __name__ == "__main__":
    main()
