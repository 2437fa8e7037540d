"""The benchmark's table: its cells, the median row of repetitions, and the machine it ran on."""

from __future__ import annotations

import os
import platform
from typing import Any


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def per_update_us(seconds: float | None, updates: int) -> int | str:
    return "-" if seconds is None else round(seconds / updates * 1e6)


def table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload and system, the run with the median rate (the lower one of an even count)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["workload"], row["system"]), []).append(row)
    return [sorted(runs, key=lambda r: r["updates/s"])[(len(runs) - 1) // 2] for runs in groups.values()]


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()}"
