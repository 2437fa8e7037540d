"""Benchmark: a burst of 2,000 /hunger replies across 100 groups, drained at Telegram's rates.

    .venv/bin/python bench/outbox_burst.py            # one bot process
    .venv/bin/python bench/outbox_burst.py -p 2       # two processes sharing the budgets

Each group gets 20 times a 🍕 message then /hunger, delivered as Telegram does (one update per chat in
flight), so every reply is distinct ("Your hunger level is k!", k = 1..20) and its order checkable. The
fake Bot API enforces Telegram's flood limits itself (30/s for the bot, 20/min per group; a send over a
limit is answered 429 and not delivered), so a sender that broke them would show 429s here. Prints the
replies delivered in each second against the limit, and lost, doubled and out-of-order replies.
Bounded: loopback only, a fixed number of updates, about 80 s of real time at real rates.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import asyncpg

from bot.apps.pizza_testing import PIZZA, hunger
from bot.embedded import EmbeddedPostgres
from bot.migrate import migrate
from bot.testing.delivery import LoopbackHttp, deliver
from bot.testing.env import SECRET, USERNAME, bot_env
from bot.testing.fake_telegram import FakeTelegram, FloodLimits, RecordedCall, serve
from bot.testing.processes import BotProcess
from bot.testing.updates import message_update

GROUPS, PER_GROUP = 100, 20


def most_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def report(delivered: list[RecordedCall], refused: int, elapsed_updates: float) -> str:
    first = min(c.at for c in delivered)
    per_second = Counter(int(c.at - first) for c in delivered)
    by_chat: dict[int, list[int]] = defaultdict(list)
    for c in delivered:
        by_chat[int(c.params["chat_id"])].append(int(re.findall(r"\d+", c.params["text"])[0]))
    expected = list(range(1, PER_GROUP + 1))
    lost = sum(len(set(expected) - set(levels)) for levels in by_chat.values()) + PER_GROUP * (
        GROUPS - len(by_chat)
    )
    doubled = sum(n - 1 for levels in by_chat.values() for n in Counter(levels).values() if n > 1)
    out_of_order = sum(1 for levels in by_chat.values() if levels != sorted(levels))
    drained = max(c.at for c in delivered) - first
    group_peak = max(
        most_in_any_window([c.at for c in delivered if c.params["chat_id"] == chat], 60) for chat in by_chat
    )
    lines = [
        f"updates delivered to the webhook in {elapsed_updates:.1f} s; replies drained in {drained:.1f} s",
        f"replies: {len(delivered)} delivered, lost {lost}, doubled {doubled}, chats out of order {out_of_order},"
        f" refused with 429 {refused}",
        f"most replies in any 1 s: {most_in_any_window([c.at for c in delivered], 1.0)} (limit 30);"
        f" most to one group in any 60 s: {group_peak} (limit 20)",
        f"mean {len(delivered) / max(drained, 1e-9):.1f} replies/s",
        "",
        "| second | replies | limit |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {per_second[s]} | 30 |" for s in range(int(drained) + 1)]
    return "\n".join(lines)


async def run(processes: int) -> str:
    embedded = None
    server_url = os.environ.get("DATABASE_URL")
    if server_url is None:
        embedded = EmbeddedPostgres.throwaway()
        server_url = embedded.dsn("postgres")
    try:
        name = f"burst_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        from urllib.parse import urlsplit, urlunsplit

        dsn = urlunsplit(urlsplit(server_url)._replace(path="/" + name))
        await migrate(dsn)
        fake = FakeTelegram(username=USERNAME)
        fake.flood_limits = FloodLimits()
        logs = Path(tempfile.mkdtemp(prefix="pizza-burst-"))
        with serve(fake) as root:
            bots = [
                BotProcess(bot_env(dsn, root, LOG_LEVEL="WARNING", DB_POOL_MAX="16"), logs / f"bot-{i}.log")
                for i in range(processes)
            ]
            try:
                for bot in bots:
                    bot.wait_ready()
                updates = []
                update_id = 1
                for round_ in range(PER_GROUP):
                    for group in range(GROUPS):
                        chat = -100_000 - group
                        updates.append(message_update(update_id, chat, f"{PIZZA} {round_}"))
                        updates.append(hunger(update_id + 1, chat, username=USERNAME))
                        update_id += 2
                urls = [b.url + "/webhook" for b in bots]
                turn = iter(range(10**9))
                client = LoopbackHttp()
                started = time.perf_counter()
                try:
                    await deliver(
                        client,
                        lambda: urls[next(turn) % len(urls)],
                        SECRET,
                        updates,
                        in_flight=40,
                        one_per_chat=True,
                        give_up_after=600,
                    )
                finally:
                    await client.aclose()
                elapsed = time.perf_counter() - started
                print(f"{len(updates)} updates in {elapsed:.1f} s; draining...", file=sys.stderr, flush=True)
                deadline = time.monotonic() + 300
                while len(fake.delivered()) < GROUPS * PER_GROUP and time.monotonic() < deadline:
                    await asyncio.sleep(1)
                    print(f"  {len(fake.delivered())} replies", file=sys.stderr, flush=True)
                await asyncio.sleep(3)  # a doubled reply would arrive now
            finally:
                for bot in bots:
                    bot.close()
        delivered = fake.delivered()
        refused = len(fake.calls("sendMessage")) - len(delivered)
        return report(delivered, refused, elapsed)
    finally:
        if embedded is not None:
            embedded.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-p", "--processes", type=int, default=1, help="bot processes sharing the database")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {args.processes} bot process(es)\n")
    print(asyncio.run(run(args.processes)))


if __name__ == "__main__":
    main()
