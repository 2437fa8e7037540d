"""CPU per update of the pizza bot's pipeline, with no HTTP and no database: the framework's own cost.

    .venv/bin/python bench/pipeline_cpu.py          # best of 5 rounds of 20000 updates

The HTTP benchmark (run.py) moves by 15% or more run to run on a shared machine, more than the change it
would have to show. This measures the process's CPU time (not wall time, so other processes' load
matters less) for routing, the handler, session load/save and the outbox on MemoryStorage; half the
updates carry a 🍕, a tenth are /hunger, spread over 1000 chats.
"""

from __future__ import annotations

import asyncio
import time

from bot.apps.pizza import build_bot
from bot.apps.pizza_testing import PIZZA
from bot.context import BotIdentity
from bot.metrics import Metrics
from bot.pipeline import Pipeline
from bot.storage.memory import MemoryStorage
from bot.testing.updates import text_update

UPDATES = 20_000
ROUNDS = 5


async def one_round() -> float:
    run = Pipeline(build_bot(), MemoryStorage(), BotIdentity(1, "pizza_bot"), Metrics())
    updates = [
        text_update(n, -(n % 1000) - 1, "/hunger" if n % 10 == 0 else (PIZZA if n % 2 else "hello"))
        for n in range(1, UPDATES + 1)
    ]
    started = time.process_time()
    for update in updates:
        await run.process(update)
    return (time.process_time() - started) / UPDATES * 1e6


def main() -> None:
    best = min(asyncio.run(one_round()) for _ in range(ROUNDS))
    print(f"{best:.1f} µs of CPU per update (best of {ROUNDS} rounds of {UPDATES})")


if __name__ == "__main__":
    main()
