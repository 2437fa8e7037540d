"""The raw asyncpg loop (`-s raw`): the bot's transactions per update (claim, session row locked, count),
run in this process at the workload's concurrency, with no HTTP and no framework; `-s raw2` does the
two-session bot's (bench/apps/two_sessions.py): a 🍕 also locks and counts its sender's row."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import asyncpg
from process_tree import cpu_seconds, database_server
from report import ms, per_update_us
from systems import System
from workloads import Workload, make_updates

from bot.apps.pizza_testing import PIZZA
from bot.types import Update


async def raw_postgres(w: Workload, dsn: str, two_sessions: bool = False) -> dict[str, Any]:
    """What one update needs, straight on asyncpg: no HTTP, no framework. The ceiling for our numbers;
    with `two_sessions`, for the two-session bot's."""
    updates, _ = make_updates(w)
    pool = await asyncpg.create_pool(dsn, min_size=min(w.in_flight, 16), max_size=16)
    gate = asyncio.Semaphore(w.in_flight)
    latencies: list[float] = []

    async def one(built: Update) -> None:
        update = built.json()
        message = update["message"]
        async with gate, pool.acquire() as conn:
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO processed_updates (bot_id, update_id) VALUES (1, $1) ON CONFLICT DO NOTHING",
                    update["update_id"],
                )
                keys = [str(message["chat"]["id"])]
                pizza = PIZZA in message["text"]
                if two_sessions and pizza:
                    keys.append(f"user:{message['from']['id']}")  # (read lazily: only by a 🍕)
                for key in keys:
                    row = await conn.fetchrow("SELECT data FROM sessions WHERE key = $1 FOR UPDATE", key)
                    if row is None:
                        await conn.execute(
                            "INSERT INTO sessions (key, data) VALUES ($1, '{\"pizza_count\": 0}') ON CONFLICT DO NOTHING",
                            key,
                        )
                        await conn.fetchrow("SELECT data FROM sessions WHERE key = $1 FOR UPDATE", key)
                    if pizza:
                        await conn.execute(
                            "UPDATE sessions SET data = jsonb_set(data, '{pizza_count}',"
                            " to_jsonb((data->>'pizza_count')::int + 1)) WHERE key = $1",
                            key,
                        )
            latencies.append(time.perf_counter() - started)

    db = await database_server(dsn)
    db_before, cpu_before = cpu_seconds(db), time.process_time()
    started = time.perf_counter()
    try:
        await asyncio.gather(*(one(u) for u in updates))
    finally:
        await pool.close()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before  # the loop is this process: its CPU is the system's
    db_cpu = cpu_seconds(db) - db_before if db else None
    latencies.sort()
    return {
        "workload": w.name,
        "system": System("raw2" if two_sessions else "raw").label,
        "updates": len(updates),
        "updates/s": round(len(updates) / elapsed),
        "p50 ms": ms(statistics.median(latencies)),
        "p99 ms": ms(latencies[int(0.99 * (len(latencies) - 1))]),
        "redelivered": "-",
        "non-2xx": "-",
        "lost": "-",
        "extra": "-",
        "CPU µs/update": per_update_us(cpu, len(updates)),
        "DB CPU µs/update": per_update_us(db_cpu, len(updates)),
        "load CPU µs/update": "-",
        "peak RSS MB": "-",
        "runs/handled": "-",
    }
