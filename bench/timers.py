"""Benchmark: durable timers fired per second, and the raw-PostgreSQL limit for the same work beside it.

    .venv/bin/python bench/timers.py                      # 5,000 timers over 500 keys, one bot process
    .venv/bin/python bench/timers.py -n 20000 -p 2 -c 8   # more timers, two processes, 8 fires at once each

The timers are scheduled through the webhook of `python -m bot serve --app bot.testing.timer_app:build_bot`
(`/at T tag quiet`), all due at one moment T, so that from T on every process fires as fast as it can:
each fire in a transaction of its own that claims (deletes) its timer and appends to its key's session.
Counted from T until the timers table is empty, then checked: every key's session lists each of its
timers exactly once. CPU per timer is the bot processes' (from /proc) over that time, and this script's
own for the raw loop. Beside it, a plain asyncpg loop does the same transactions (pick a due timer with
SKIP LOCKED, delete it, lock, read and write the session, commit) at the same concurrency, no framework:
the machine's limit for this work. Uses DATABASE_URL when set, else a throwaway embedded PostgreSQL.
Bounded: loopback only, a fixed number of timers, at most two minutes of firing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from databases import fresh_database, postgres_server  # bench/ modules: this script runs from bench/ too
from process_tree import cpu_seconds

from bot.testing.delivery import LoopbackHttp, deliver
from bot.testing.env import SECRET, USERNAME, bot_env
from bot.testing.fake_telegram import FakeTelegram, serve
from bot.testing.processes import BotProcess
from bot.testing.updates import message_update

BOT_ID = 123456789  # bot_env's token
APP = "bot.testing.timer_app:build_bot"


def plan(timers: int, keys: int) -> list[tuple[int, str]]:
    """(chat, tag) of every timer, keys taking turns."""
    return [(-200_000 - n % keys, f"t{n}") for n in range(timers)]


async def wait_empty(dsn: str, due: float, limit: float) -> tuple[float, float]:
    """Seconds from `due` until the timers table is empty, and until the first fire (table shrinking)."""
    conn = await asyncpg.connect(dsn)
    try:
        total = await conn.fetchval("SELECT count(*) FROM timers")
        first = None
        while True:
            left = await conn.fetchval("SELECT count(*) FROM timers")
            now = time.time()
            if first is None and left < total:
                first = now
            if left == 0:
                return now - due, (first or now) - due
            if now > due + limit:
                raise TimeoutError(f"{left} timers left after {limit:g} s")
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


async def check_sessions(dsn: str, planned: list[tuple[int, str]]) -> int:
    """How many timers' effects are missing or doubled in the sessions (0: each applied exactly once)."""
    expected: dict[str, list[str]] = {}
    for chat, tag in planned:
        expected.setdefault(f"fires:{chat}", []).append(tag)
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT key, data::text AS data FROM sessions WHERE key LIKE 'fires:%'")
    finally:
        await conn.close()
    found = {r["key"]: json.loads(r["data"])["tags"] for r in rows}
    wrong = 0
    for key, tags in expected.items():
        got = found.get(key, [])
        wrong += abs(len(got) - len(tags)) + len(set(tags) ^ set(got))
    return wrong


async def framework(dsn: str, args: argparse.Namespace, logs: Path) -> dict[str, float]:
    fake = FakeTelegram(username=USERNAME)
    with serve(fake) as root:
        env = bot_env(dsn, root, APP=APP, LOG_LEVEL="WARNING", TIMER_CONCURRENCY=str(args.concurrency))
        bots = [BotProcess(env, logs / f"bot-{i}.log") for i in range(args.processes)]
        try:
            for bot in bots:
                bot.wait_ready()
            due = time.time() + args.lead
            planned = plan(args.timers, args.keys)
            updates = [
                message_update(n + 1, chat, f"/at {due:.6f} {tag} quiet", from_id=7)
                for n, (chat, tag) in enumerate(planned)
            ]
            urls = [b.url + "/webhook" for b in bots]
            turn = iter(range(10**9))
            client = LoopbackHttp()
            try:
                await deliver(client, lambda: urls[next(turn) % len(urls)], SECRET, updates, in_flight=32)
            finally:
                await client.aclose()
            if time.time() > due:
                print("warning: scheduling ended after T; raise --lead", file=sys.stderr)
            pids = [b.proc.pid for b in bots]
            cpu = cpu_seconds(pids)
            elapsed, first = await wait_empty(dsn, due, 120)
            cpu = cpu_seconds(pids) - cpu
            wrong = await check_sessions(dsn, planned)
        finally:
            for bot in bots:
                bot.close()
    return {"seconds": elapsed, "first": first, "wrong": wrong, "cpu": cpu}


async def raw_postgres(dsn: str, args: argparse.Namespace) -> dict[str, float]:
    """The same work in a plain asyncpg loop: the timers inserted directly, then fired by
    processes x concurrency workers, each fire one transaction."""
    workers = args.processes * args.concurrency
    pool = await asyncpg.create_pool(dsn, min_size=workers, max_size=workers)
    try:
        await pool.execute("DELETE FROM timers; DELETE FROM sessions")
        planned = plan(args.timers, args.keys)
        await pool.executemany(
            "INSERT INTO timers (bot_id, key, name, handler, payload, origin, due_at)"
            " VALUES ($1, $2, $3, 'fire', '{}', 'null', now())",
            [(BOT_ID, str(chat), tag) for chat, tag in planned],
        )
        await pool.executemany(
            "INSERT INTO sessions (key, data) VALUES ($1, '{\"tags\": []}') ON CONFLICT DO NOTHING",
            [(f"fires:{chat}",) for chat in {chat for chat, _ in planned}],
        )

        async def worker() -> None:
            async with pool.acquire() as conn:
                while True:
                    async with conn.transaction():
                        row = await conn.fetchrow(
                            "DELETE FROM timers WHERE id = (SELECT id FROM timers WHERE bot_id = $1"
                            " AND due_at <= now() ORDER BY due_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)"
                            " RETURNING key, name",
                            BOT_ID,
                        )
                        if row is None:
                            return
                        key = "fires:" + row["key"]
                        data = await conn.fetchval(
                            "SELECT data::text FROM sessions WHERE key = $1 FOR UPDATE", key
                        )
                        tags = json.loads(data)["tags"] + [row["name"]]
                        await conn.execute(
                            "UPDATE sessions SET data = $2::jsonb WHERE key = $1",
                            key,
                            json.dumps({"tags": tags}),
                        )

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        wrong = await check_sessions(dsn, planned)
    finally:
        await pool.close()
    return {"seconds": elapsed, "first": float("nan"), "wrong": wrong, "cpu": cpu}


async def run(args: argparse.Namespace) -> str:
    with postgres_server() as (server_url, _):
        logs = Path(tempfile.mkdtemp(prefix="timers-bench-"))
        ours = await framework(await fresh_database(server_url), args, logs)
        raw = await raw_postgres(await fresh_database(server_url), args)
    lines = [
        f"{args.timers} timers over {args.keys} keys, all due at once; {args.processes} process(es),"
        f" {args.concurrency} fires at once each",
        "",
        "| system | timers/s | all fired in | first fire after due | CPU µs/timer | missing or doubled |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in (("bot (timer loop, Pipeline.fire)", ours), ("raw asyncpg loop", raw)):
        first = "-" if math.isnan(row["first"]) else f"{row['first'] * 1000:.0f} ms"
        lines.append(
            f"| {name} | {args.timers / row['seconds']:,.0f} | {row['seconds']:.2f} s | {first} |"
            f" {row['cpu'] / args.timers * 1e6:,.0f} | {row['wrong']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", "--timers", type=int, default=5000)
    parser.add_argument("-k", "--keys", type=int, default=500)
    parser.add_argument("-p", "--processes", type=int, default=1, help="bot processes sharing the database")
    parser.add_argument("-c", "--concurrency", type=int, default=4, help="TIMER_CONCURRENCY")
    parser.add_argument("--lead", type=float, default=20.0, help="seconds from now the timers are due")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}\n")
    print(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
