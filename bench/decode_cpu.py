"""CPU time of `bot.telegram.decode_update` per webhook body, for two checkouts, in alternating rounds.

    .venv/bin/python bench/decode_cpu.py /path/to/main /path/to/branch --rounds 5

Decoding is the step that changes when the Bot API types do, and a few microseconds of it vanish in the
noise of `bench/cpu_per_update.py` (~250 µs of CPU per update, HTTP and PostgreSQL included). Here each
round runs a fresh interpreter per checkout (PYTHONPATH picks the code, from a directory without a `bot`
package) that decodes the same bodies: workload T's updates (a 🍕 or a plain text in a supergroup, with
the fields Telegram sends), and CPU time (`time.process_time`) is divided by their number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bot.apps.pizza_testing import PIZZA
from bot.testing.updates import message_update

BODIES = 2000
REPEAT = 25

# Runs inside the checkout under test: decode every body REPEAT times, print µs of CPU per decode.
MEASURE = """
import json, sys, time
from bot.telegram import decode_update
bodies = [line.encode() for line in open(sys.argv[1], encoding="utf-8").read().splitlines()]
for body in bodies:  # warm up: first decodes build msgspec's type info
    decode_update(body)
started = time.process_time()
for _ in range(int(sys.argv[2])):
    for body in bodies:
        decode_update(body)
print((time.process_time() - started) / (len(bodies) * int(sys.argv[2])) * 1e6)
"""


def one_round(tree: str, bodies: Path) -> float:
    env = {**os.environ, "PYTHONPATH": tree}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(bodies), str(REPEAT)],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return float(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs=2, help="two checkouts to compare (their root folders)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        bodies = Path(folder) / "bodies.jsonl"
        updates = [
            message_update(n, -(100_000 + n % 1000), PIZZA if n % 2 else "hello") for n in range(BODIES)
        ]
        bodies.write_text("\n".join(u.raw.decode() for u in updates), encoding="utf-8")
        figures: dict[str, list[float]] = {tree: [] for tree in args.trees}
        for _ in range(args.rounds):
            for tree in args.trees:
                us = one_round(tree, bodies)
                figures[tree].append(us)
                print(f"{tree}: {us:.2f} µs CPU/decode", flush=True)
    for tree, values in figures.items():
        print(f"{tree}: median {statistics.median(values):.2f} µs CPU/decode over {len(values)} rounds")


if __name__ == "__main__":
    main()
