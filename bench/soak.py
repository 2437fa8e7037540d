"""`bench/run.py --soak`: Telegram-like traffic at a fixed rate to our bot, its resident memory printed as
it goes."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from process_tree import rss_mb
from systems import ROOT, deployed_env, web_command

from bot.apps.pizza_testing import PIZZA
from bot.testing.delivery import LoopbackHttp, deliver
from bot.testing.env import SECRET
from bot.testing.processes import BotProcess
from bot.testing.updates import message_update

SOAK_CHATS = 20_000


async def soak(seconds: float, rate: float, dsn: str, root: str, logs: Path) -> None:
    """Telegram-like traffic (at most one update per chat in flight) at a fixed rate for `seconds`,
    printing the bot's resident memory every 30 s: it must stay flat. SOAK_CHATS chats, more than the
    sessions a process remembers (SESSION_CACHE, 5,000): that memory is full, and evicting, all along."""
    env = deployed_env(dsn, root)
    bot = BotProcess(env, logs / "soak.log", command=web_command(ROOT, sys.executable, None), cwd=ROOT)
    client = LoopbackHttp()
    try:
        bot.wait_ready()
        url = bot.url + "/webhook"
        started = time.monotonic()
        sent, samples = 0, []
        next_sample = started
        while (now := time.monotonic()) < started + seconds:
            if now >= next_sample:
                samples.append((round(now - started), f"{rss_mb([bot.proc.pid]):.1f}"))
                print(f"{samples[-1][0]:>5} s  {sent:>8} updates  RSS {samples[-1][1]} MB", file=sys.stderr)
                next_sample += 30
            # One second's worth of updates, each chat at most once: Telegram's shape.
            batch = [
                message_update(
                    sent + i + 1, -100_000 - (sent + i) % SOAK_CHATS, f"{PIZZA} again" if i % 2 else "hi"
                )
                for i in range(int(rate))
            ]
            tick = time.monotonic()
            await deliver(client, lambda: url, SECRET, batch, in_flight=40, one_per_chat=True)
            sent += len(batch)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        samples.append((round(time.monotonic() - started), f"{rss_mb([bot.proc.pid]):.1f}"))
        print(f"soak: {sent} updates in {seconds:.0f} s at {rate:g}/s; RSS MB over time: {samples}")
    finally:
        await client.aclose()
        bot.close()
