"""CPU time of a `python -m bot serve` process per webhook update, PostgreSQL and HTTP included.

    .venv/bin/python bench/process_cpu.py

Updates are posted one at a time (half of them 🍕, spread over 100 chats), and the bot process's own CPU
time (from /proc, so Linux only) is divided by their number. Unlike updates/s, this hardly depends on
what else the machine runs, which makes before/after comparisons on a shared machine possible.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import httpx

from bot.app import SECRET_HEADER
from bot.apps.pizza_testing import PIZZA
from bot.embedded import EmbeddedPostgres
from bot.migrate import migrate
from bot.testing.env import SECRET, bot_env
from bot.testing.fake_telegram import FakeTelegram, serve
from bot.testing.processes import BotProcess
from bot.testing.updates import encode, message_update

WARM_UP = 200
UPDATES = 3000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> None:
    database = EmbeddedPostgres.throwaway()
    try:
        asyncio.run(migrate(database.dsn()))
        with (
            serve(FakeTelegram()) as root,
            BotProcess(bot_env(database.dsn(), root), Path(tempfile.mkdtemp()) / "bot.log") as bot,
            httpx.Client(base_url=bot.url, headers={SECRET_HEADER: SECRET}) as client,
        ):
            bot.wait_ready()

            def post(first: int, count: int) -> None:
                for n in range(first, first + count):
                    update = message_update(n, -(n % 100) - 1, PIZZA if n % 2 else "hello")
                    client.post(
                        "/webhook", content=encode(update), headers={"content-type": "application/json"}
                    )

            post(1, WARM_UP)
            before = cpu_seconds(bot.proc.pid)
            post(WARM_UP + 1, UPDATES)
            used = cpu_seconds(bot.proc.pid) - before
            bot.terminate()
        print(f"{used / UPDATES * 1e6:.0f} µs of bot-process CPU per update ({UPDATES} updates)")
    finally:
        database.stop()


if __name__ == "__main__":
    main()
