"""The process's metrics in Prometheus' text format (README: "Metrics" lists each one).

prometheus_client provides the registry, the metric types and the exposition format. Each runtime has
its own registry, so tests and several bots in one process do not add into each other. Labelled counters
whose label values are known in advance are created at start-up, so they read 0 before first use
instead of being missing. The histograms, and the counter every update adds to, are our own collectors
(`_Histogram`, `_UpdateCounter`), exposed exactly as prometheus_client's Histogram and Counter are.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .storage import OutboxStatus
from .types import UPDATE_KINDS as _KINDS

__all__ = ["CONTENT_TYPE", "UPDATE_KINDS", "UPDATE_OUTCOMES", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

UPDATE_KINDS = (*_KINDS, "other")  # "other": a kind the bot does not route
UPDATE_OUTCOMES = ("applied", "duplicate", "ignored", "failed", "dead_letter", "unavailable")
TIMER_OUTCOMES = ("applied", "duplicate", "failed", "dead_letter", "unavailable")
CALL_OUTCOMES = ("sent", "retry", "failed", "rate_limited", "moved")
WAIT_REASONS = ("bot_budget", "chat_budget", "order", "taken_over")

# Seconds. Updates take milliseconds and must finish in REQUEST_DEADLINE (25 s); waits for a lock or a
# pooled connection are 0 when all is well and up to their timeouts (5 s by default) when not.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25)
_WAIT = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10)
# Seconds a timer fired after it was due: under a second while the bot runs, up to the downtime after.
_LATE = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
# Seconds the event loop woke late (bot/loop_lag.py): about a millisecond when nothing blocks it.
_LAG = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _created_series() -> bool:
    """Whether prometheus_client's own metrics expose `_created` samples now (off with
    PROMETHEUS_DISABLE_CREATED_SERIES=True or disable_created_metrics()): ours follow them."""
    return bool(getattr(prometheus_client.metrics, "_use_created", True))


class _Histogram:
    """A histogram without labels, its samples those of prometheus_client's Histogram (cumulative buckets,
    count, sum, created), for the ones observed on every update and every fire.

    prometheus_client's observe() checks that the metric has its labels, then takes a lock for the sum and
    one for the bucket it finds with a Python loop. With the update counter's increment, that was 3.7% of
    the instructions an update took in this process (368,300 then 354,700 per update: valgrind, 1,000
    updates, half applied and half ignored, through Pipeline.process on PostgreSQL). Here: one bisect
    and two additions. Every metric is observed on the event loop's thread, so nothing is locked."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = (*buckets, math.inf)
        # (prometheus_client's own spelling of each bound: "0.001", "1.0", "+Inf")
        self._les: list[str] = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        self._counts = [0.0] * len(self._bounds)  # per bucket, not cumulative
        self._sum = 0.0
        self._created = time.time()
        registry.register(self)

    def observe(self, amount: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1  # the first bound >= amount
        self._sum += amount

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation)
        counts = itertools.accumulate(self._counts)
        family.add_metric([], list(zip(self._les, counts, strict=True)), self._sum)
        if _created_series():
            family.add_sample(f"{self._name}_created", {}, self._created)
        yield family


class _UpdateCounter:
    """Updates by kind and outcome, every pair known from the start (each reads 0 before first use), its
    samples those of prometheus_client's Counter with those labels. Added to once per update: a plain
    dict of floats, for the reason `_Histogram` gives."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counts = {(kind, outcome): 0.0 for kind in UPDATE_KINDS for outcome in UPDATE_OUTCOMES}
        self._created = time.time()
        registry.register(self)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            "bot_updates", "Updates received, by kind and outcome.", labels=["kind", "outcome"]
        )

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for labels, value in self.counts.items():
            family.add_metric(labels, value, created=self._created if _created_series() else None)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.updates = _UpdateCounter(r)
        self.update_seconds = _Histogram(
            "bot_update_duration_seconds",
            "Time to process one update: decode to commit (replies are sent after).",
            _LATENCY,
            r,
        )
        self.lock_wait = _Histogram(
            "bot_lock_wait_seconds", "Time waiting for a session's row lock.", _WAIT, r
        )
        self.pool_wait = _Histogram(
            "bot_pool_wait_seconds", "Time waiting for a pooled database connection.", _WAIT, r
        )
        self.optimistic_conflicts = Counter(
            "bot_optimistic_conflicts",
            "Optimistic attempts that found their session changed (or the update applied before) and"
            " ran again with the row locked (DB_CONCURRENCY=optimistic).",
            registry=r,
        )
        self.stuck_updates = Counter(
            "bot_stuck_updates",
            "Update attempts still running 5 s (RECORD_WITHIN) past REQUEST_DEADLINE: their code ignored"
            " the cancellation; their database connections were closed (bot/overdue.py).",
            registry=r,
        )
        self.batches = Counter(
            "bot_statement_batches",
            "Batches of optimistic reads and statements sent together (bot/storage/postgres/batches.py),"
            " by outcome: sent, or failed (each statement sent again on its own: a claim race, a value"
            " refused, a row locked elsewhere, a lost connection).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("sent", "failed"):
            self.batches.labels(outcome)  # both series from the start, at 0
        self.api_calls = Counter(
            "bot_api_calls",
            "Outgoing Bot API calls by method and outcome: sent, retry (5xx, network error, no answer"
            " in time), failed (refused, not retried), rate_limited (429), moved (to a supergroup).",
            ["method", "outcome"],
            registry=r,
        )
        self.flood_waits = Counter(
            "bot_api_429",
            "429 answers, by what they paused: one chat, or the whole bot.",
            ["scope"],
            registry=r,
        )
        self.outbox_waits = Counter(
            "bot_outbox_waits",
            "Sends put back in the outbox to wait: for the whole bot's budget, the chat's, or an earlier"
            " reply to the same chat; or left to another sender that took them over (taken_over).",
            ["reason"],
            registry=r,
        )
        self.outbox_given_up = Counter(
            "bot_outbox_given_up",
            "Calls marked failed because they could not be sent within OUTBOX_GIVE_UP.",
            ["method"],
            registry=r,
        )
        self.outbox_unsent = Gauge(
            "bot_outbox_unsent", "Calls queued and not yet sent (nor given up), all processes.", registry=r
        )
        self.outbox_oldest = Gauge(
            "bot_outbox_oldest_unsent_age_seconds",
            "Age of the oldest unsent call; 0 when none.",
            registry=r,
        )
        self.send_pause = Gauge(
            "bot_send_pause_seconds", "Seconds left of a 429 pause of every send; 0 when none.", registry=r
        )
        self.paused_chats = Gauge("bot_send_paused_chats", "Chats paused by a 429 right now.", registry=r)
        self.timers = Counter(
            "bot_timers",
            "Timer fires by outcome: applied, duplicate (another process fired it), failed (its handler"
            " raised and the error hook handled it), dead_letter (failed for good: the timer is kept as"
            " failed, never fired again), unavailable (a transient failure: fired again after its lease).",
            ["outcome"],
            registry=r,
        )
        self.timer_seconds = _Histogram(
            "bot_timer_duration_seconds", "Time to fire one timer: claim to commit.", _LATENCY, r
        )
        self.timer_lateness = _Histogram(
            "bot_timer_lateness_seconds",
            "How long after it was due a timer was picked to fire.",
            _LATE,
            r,
        )
        self.loop_lag = _Histogram(
            "bot_event_loop_lag_seconds",
            "How late the event loop woke a timer due every 0.5 s: the time a blocking call (or more work"
            " than the process can do) held up every chat (bot/loop_lag.py).",
            _LAG,
            r,
        )
        for outcome in CALL_OUTCOMES:
            self.api_calls.labels("sendMessage", outcome)
        for scope in ("chat", "bot"):
            self.flood_waits.labels(scope)
        for reason in WAIT_REASONS:
            self.outbox_waits.labels(reason)
        self.outbox_given_up.labels("sendMessage")
        self._timers = {outcome: self.timers.labels(outcome) for outcome in TIMER_OUTCOMES}

    def update_done(self, kind: str, outcome: str, seconds: float) -> None:
        self.updates.counts[kind, outcome] += 1
        self.update_seconds.observe(seconds)

    def timer_done(self, outcome: str, seconds: float, late: float) -> None:
        self._timers[outcome].inc()
        self.timer_seconds.observe(seconds)
        self.timer_lateness.observe(late)

    def set_outbox_status(self, status: OutboxStatus | None) -> None:
        """Read at scrape time; None (the database did not answer) shows as NaN, not a stale value."""
        nan = float("nan")
        self.outbox_unsent.set(nan if status is None else status.unsent)
        self.outbox_oldest.set(nan if status is None else status.oldest_age)
        self.send_pause.set(nan if status is None else status.paused_for)
        self.paused_chats.set(nan if status is None else status.paused_chats)

    def count(self, name: str, **labels: str) -> float:
        """A sample's current value (tests, and whoever reads metrics in process); 0 when absent."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
