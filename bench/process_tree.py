"""CPU time and resident memory of processes and their descendants (uvicorn's workers with
WEB_CONCURRENCY > 1, PostgreSQL's backends), read from /proc."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import asyncpg


def _tree(pid: int) -> list[int]:
    """The process and its descendants."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                pids += _tree(int(child))
    return pids


def _trees(pids: list[int]) -> set[int]:
    return {p for root in pids for p in _tree(root)}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their descendants so far."""
    ticks = 0
    for pid in _trees(pids):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _largest_mb(pids: list[int], field: str) -> float:
    """The largest value of a /proc/PID/status field given in kB (`VmRSS:`...) among these processes and
    their descendants, in MB."""
    largest = 0
    for pid in _trees(pids):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field):
                    largest = max(largest, int(line.split()[1]))
    return largest / 1024


def peak_rss_mb(pids: list[int]) -> float:
    """The largest peak resident set (VmHWM) of any one of these processes or their descendants."""
    return _largest_mb(pids, "VmHWM:")


def rss_mb(pids: list[int]) -> float:
    """Current resident memory of the largest of these processes (or their descendants)."""
    return _largest_mb(pids, "VmRSS:")


async def database_server(dsn: str) -> list[int]:
    """The database server's postmaster, when it runs on this machine: its CPU and its backends' (live,
    and those it reaped) is the database's share of an update. Empty when it cannot be found (another
    host, a data directory this user cannot read): the column then says "-"."""
    try:
        conn = await asyncpg.connect(dsn)
        try:
            directory = await conn.fetchval("SHOW data_directory")
        finally:
            await conn.close()
        return [int((Path(directory) / "postmaster.pid").read_text().split()[0])]
    except (OSError, ValueError, asyncpg.PostgresError):
        return []
