"""What PgBouncer adds to one round trip on one host: docs/SCALING.md's "one hop per round trip".

    .venv/bin/python bench/pooler_hop.py --rounds 5

A PgBouncer in transaction mode (`bot.testing.pgbouncer`, as the tests run it) in front of a throwaway
embedded PostgreSQL. Each round times ROUND_TRIPS simple-protocol `SELECT 1`s (one round
trip each) on one connection straight to the server, then on one through the pooler, and prints the
medians and their difference; the last line gives the median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import asyncpg

from bot.embedded import EmbeddedPostgres
from bot.testing.pgbouncer import PgBouncer

ROUND_TRIPS = 5000
WARM_UP = 500


async def median_round_trip(dsn: str) -> float:
    """The median time of one simple-protocol `SELECT 1`, in ms."""
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        for _ in range(WARM_UP):
            await conn.execute("SELECT 1")
        times = []
        for _ in range(ROUND_TRIPS):
            start = time.perf_counter()
            await conn.execute("SELECT 1")
            times.append(time.perf_counter() - start)
    finally:
        await conn.close()
    return statistics.median(times) * 1e3


async def measure(server: str, pooled: str, rounds: int) -> None:
    hops = []
    for n in range(rounds):
        direct = await median_round_trip(server)
        through = await median_round_trip(pooled)
        hops.append(through - direct)
        print(
            f"round {n + 1}: direct {direct:.3f} ms, through PgBouncer {through:.3f} ms, hop {through - direct:.3f} ms"
        )
    print(f"median hop over {rounds} rounds: {statistics.median(hops):.3f} ms per round trip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    embedded = EmbeddedPostgres.throwaway()  # (its socket reachable by the user PgBouncer runs as)
    try:
        server = embedded.dsn()
        with PgBouncer(server, run_as=embedded.system_user) as pooler:
            asyncio.run(measure(server, pooler.pooled(server), args.rounds))
    finally:
        embedded.stop()


if __name__ == "__main__":
    main()
