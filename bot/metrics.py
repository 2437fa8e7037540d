"""Process-local counters, exposed at /metrics in Prometheus' text format."""

from __future__ import annotations

from collections import Counter

__all__ = ["Metrics"]

_HELP = {
    "updates_total": "Webhook updates by outcome.",
    "handler_errors_total": "Updates whose handler raised; rolled back and acknowledged.",
    "storage_unavailable_total": "Updates answered 503 because the database could not do its part.",
    "replies_total": "Outgoing Bot API calls by result.",
}


class Metrics:
    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()

    def inc(self, name: str, label: str = "") -> None:
        self._counts[name, label] += 1

    def get(self, name: str, label: str = "") -> int:
        return self._counts[name, label]

    def render(self) -> str:
        lines: list[str] = []
        for name, help_text in _HELP.items():
            lines += [f"# HELP bot_{name} {help_text}", f"# TYPE bot_{name} counter"]
            for (counted, label), value in sorted(self._counts.items()):
                if counted == name:
                    labels = f'{{outcome="{label}"}}' if label else ""
                    lines.append(f"bot_{name}{labels} {value}")
        return "\n".join(lines) + "\n"
