"""Benchmark: the ACCEPTANCE.md workloads over HTTP on loopback, and the raw-PostgreSQL limit beside them.

    .venv/bin/python bench/run.py                 # all workloads, one bot process
    .venv/bin/python bench/run.py -w A,T -p 2     # some workloads, two bot processes
    .venv/bin/python bench/run.py --quick         # a smoke run: a tenth of every workload

Each row (workload, system, repetition) gets a database of its own, migrated by the code that runs on it
(a `bot@DIR` by DIR's Procfile `release:` command) and dropped after the row, and fresh servers talking to
the fake Bot API. Our bot runs as deployed: the Procfile's web command (listening on 127.0.0.1 instead of
all interfaces), with only what a user must set (DATABASE_URL, PORT, BOT_TOKEN, WEBHOOK_SECRET,
WEBHOOK_URL, and TELEGRAM_API_ROOT pointing at the fake): every other setting at the README's default,
none taken from this shell's environment. Updates are delivered as Telegram does (redelivered until a
2xx), then every chat is asked /hunger and the answers are compared with what was sent: lost and extra
increments are counted, not assumed.
Uses DATABASE_URL when set, else a throwaway embedded PostgreSQL. Bounded: loopback only, fixed counts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from databases import fresh_database, new_database, postgres_server
from raw_loop import raw_postgres
from report import machine, median_rows, table
from server_row import run_server
from soak import soak
from systems import System, bot_settings, grammy_ready, migrate_for
from workloads import WORKLOADS

from bot.testing.env import USERNAME
from bot.testing.fake_telegram import FakeTelegram, serve


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-w", "--workloads", default="A,B,C,T,G")
    parser.add_argument(
        "-s",
        "--systems",
        default="bot,grammy,raw",
        help="what to measure side by side: bot, bot2 (two sessions), bot@DIR (another checkout's code), "
        "bot+NAME=VALUE+... (a setting), grammy, raw, raw2 (the raw loop doing the two-session bot's work)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: a tenth of every workload")
    parser.add_argument(
        "-p", "--processes", type=int, default=1, help="server processes sharing the database"
    )
    parser.add_argument("-r", "--repeat", type=int, default=1, help="runs of each; the median is reported")
    parser.add_argument(
        "--profile",
        type=Path,
        help="run our bot under py-spy (pip install py-spy) and write collapsed stacks to this folder",
    )
    parser.add_argument("--soak", type=float, help="instead: Telegram-like traffic for this many seconds")
    parser.add_argument("--rate", type=float, default=500, help="updates per second during --soak")
    args = parser.parse_args()
    chosen = [WORKLOADS[name.strip()] for name in args.workloads.split(",")]
    if args.quick:
        chosen = [w.quick() for w in chosen]
    systems = [System.parse(text) for text in args.systems.split(",")]
    # The servers inherit this environment: none of the bot's own settings may come from it, or "defaults"
    # would be whatever this shell has (DATABASE_URL is read by postgres_server, and set for each server).
    for name in sorted(bot_settings() & os.environ.keys()):
        if name != "DATABASE_URL":
            print(
                f"{name} from this environment is not passed on: the servers run with defaults",
                file=sys.stderr,
            )
            del os.environ[name]
    if any(s.kind == "grammy" for s in systems) and (why := grammy_ready()) is not None:
        print(why, file=sys.stderr)
        systems = [s for s in systems if s.kind != "grammy"]

    logs = Path(tempfile.mkdtemp(prefix="pizza-bench-"))
    fake = FakeTelegram(username=USERNAME)
    rows: list[dict[str, Any]] = []
    with postgres_server() as (server_url, where), serve(fake) as root:
        if args.soak:
            await soak(args.soak, args.rate, await fresh_database(server_url), root, logs)
            return
        for w in chosen:
            for run in range(args.repeat):
                # Each run starts with another system, so none always gets the quieter moment.
                for system in systems[run % len(systems) :] + systems[: run % len(systems)]:
                    # A database per row, migrated by the code that runs on it: old and new checkouts'
                    # migrations never meet, and no row starts on another's sessions.
                    async with new_database(server_url) as dsn:
                        await migrate_for(system, dsn, root, logs)
                        if system.kind in ("raw", "raw2"):
                            row = await raw_postgres(w, dsn, two_sessions=system.kind == "raw2")
                        else:
                            row = await run_server(
                                w, system, dsn, root, fake, args.processes, logs, args.profile
                            )
                    row["load"] = f"{os.getloadavg()[0]:.1f}"
                    rows.append(row)
                    print(table(rows[-1:]), file=sys.stderr, flush=True)
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, {machine()}, {args.processes} server process(es) each, "
        f"PostgreSQL {where}, median of {args.repeat} run(s); "
        "load = 1-minute load average after the row\n"
    )
    print(table(median_rows(rows)))


if __name__ == "__main__":
    # A stopped benchmark still stops its servers and its database (the finally blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    asyncio.run(main())
