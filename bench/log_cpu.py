"""CPU time of the line every update logs at LOG_LEVEL=INFO (the default), for checkouts, in alternating rounds.

    .venv/bin/python bench/log_cpu.py /path/to/main . --rounds 5
    .venv/bin/python bench/log_cpu.py /path/to/main . --format json

Each round runs a fresh interpreter per checkout (PYTHONPATH picks the code, from a directory without a
`bot` package) that sets up logging as `serve` does (`setup_logging`, stderr to a file) and writes LINES
update lines as that checkout's pipeline writes them (`bot.logs.log_update` where it exists, else
`log.info` with the update's fields). Two figures per line: the CPU time of the calling thread (the
event loop's, in the server) and of the whole process (a writer thread included), the latter counted
until `logging.shutdown()` has written every line. On a machine shared with other work, compare the
rounds of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

LINES = 50_000

# Runs inside the checkout under test; prints "caller_µs process_µs lines_written".
MEASURE = """
import logging, os, sys, time
sys.stderr = open(sys.argv[1], "w", buffering=1)  # as a server's stderr redirected to a file: line-buffered
from bot.logs import setup_logging
from bot.testing.env import make_settings
setup_logging(make_settings("postgresql://u:pw@127.0.0.1/db", "http://127.0.0.1:1", LOG_FORMAT=sys.argv[2]))
log = logging.getLogger("bot.pipeline")
try:
    from bot.logs import log_update
except ImportError:  # before issue 20: the pipeline's own call
    def log_update(logger, update_id, chat, outcome, seconds):
        logger.info("update %d: %s in %.1f ms", update_id, outcome, seconds * 1000,
                    extra={"update_id": update_id, "chat": chat, "outcome": outcome, "duration": round(seconds, 6)})
n = int(sys.argv[3])
thread, process = time.thread_time(), time.process_time()
for i in range(n):
    if log.isEnabledFor(logging.INFO):
        log_update(log, i, -100_000 - i % 1000, "applied", 0.0031)
thread = time.thread_time() - thread
logging.shutdown()
process = time.process_time() - process
print(thread / n * 1e6, process / n * 1e6, sum(1 for _ in open(sys.argv[1])))
"""


def one_round(tree: str, log_format: str) -> tuple[float, float]:
    with tempfile.NamedTemporaryFile(suffix=".log") as out:
        result = subprocess.run(
            [sys.executable, "-c", MEASURE, out.name, log_format, str(LINES)],
            env={**os.environ, "PYTHONPATH": tree},
            cwd=tempfile.gettempdir(),
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
    caller, process, written = result.stdout.split()
    if int(written) < LINES:
        raise RuntimeError(f"{tree}: {written} of {LINES} lines written")
    return float(caller), float(process)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="+", help="checkouts to compare")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--format", default="text", choices=("text", "json"))
    args = parser.parse_args()
    trees = [os.path.abspath(tree) for tree in args.trees]
    results: dict[str, list[tuple[float, float]]] = {tree: [] for tree in trees}
    for _ in range(args.rounds):
        for tree in trees:
            results[tree].append(one_round(tree, args.format))
    print(f"LOG_FORMAT={args.format}, {LINES} lines a round, µs of CPU per line (caller / whole process)")
    for tree, rounds in results.items():
        each = ", ".join(f"{caller:.1f}/{process:.1f}" for caller, process in rounds)
        caller = statistics.median(c for c, _ in rounds)
        process = statistics.median(p for _, p in rounds)
        print(f"{tree}: rounds {each}; median {caller:.1f} / {process:.1f}")


if __name__ == "__main__":
    main()
