"""Logging for the whole process, uvicorn's lines included: readable text by default, or one JSON
object per line (LOG_FORMAT=json) for a log service.

A JSON line has time, level, logger and message, plus update_id, chat, outcome and duration (seconds)
when the line is about one update or one reply, and error with the traceback when there is one. Every
line, in either format, has the bot token, the webhook secret and the database password replaced by
"***" before it is written: a secret that reaches a log line by way of an exception's text (a URL, a
DSN) is still not written.

At INFO every update writes a line, so a line must cost little next to an update (~100 µs of CPU): the
standard path (a full LogRecord, Formatter's strftime per line, a locked write and flush per line) cost
~30 µs, a quarter of the throughput (bench/README.md). Here the caller only builds the record and queues
it; a writer thread formats the queue and writes it in one call every WRITE_INTERVAL, and records leave
out the thread and process fields no line shows. A quiet process's lines, and every WARNING or worse, are
written at once; the queue is written out at exit (logging.shutdown) and before a forked worker leaves.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from typing import TextIO
from urllib.parse import urlsplit

from .config import Settings

__all__ = ["JsonFormatter", "LineWriter", "TextFormatter", "secrets_of", "setup_logging"]

# How long a line may wait in the queue while the process is busy (each wait, one write of them all).
WRITE_INTERVAL = 0.05

# The `extra=` fields the framework attaches to a record, in the order a JSON line shows them.
FIELDS = ("update_id", "chat", "outcome", "duration")


class _Redacting(logging.Formatter):
    def __init__(self, secrets: Iterable[str], fmt: str | None = None) -> None:
        super().__init__(fmt)
        # Longest first, so a secret containing another is replaced whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._second = -1  # the whole second last formatted, and its text: one strftime per second
        self._second_text = ""

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def _seconds(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second_text = self.second_text(second)
            self._second = second
        return self._second_text

    def second_text(self, second: int) -> str:
        raise NotImplementedError


class TextFormatter(_Redacting):
    """`2026-12-02 11:29:17,838 INFO bot.pipeline: update 85: applied in 3.1 ms` (local time), then the
    traceback's lines when there is one: logging.Formatter's default layout, built for less."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__(secrets, "%(asctime)s %(levelname)s %(name)s: %(message)s")

    def second_text(self, second: int) -> str:
        return time.strftime(self.default_time_format, self.converter(second))

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return self.redact(super().format(record))  # rare: the standard path, tracebacks and all
        record.message = record.getMessage()
        when = self._seconds(record.created)
        return self.redact(
            f"{when},{int(record.msecs):03d} {record.levelname} {record.name}: {record.message}"
        )


class JsonFormatter(_Redacting):
    def second_text(self, second: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": f"{self._seconds(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["error"] = record.exc_text
        return self.redact(json.dumps(line, ensure_ascii=False, default=str))


class LineWriter(logging.Handler):
    """Formatted records on a stream, in order, written by a thread of its own in batches.

    `emit` only queues the record (its message made final first, so an argument changed later does not
    change the line); the thread wakes every `interval` and writes whatever is queued in one call. A
    record finds the handler quiet (nothing written for `interval`) or is a WARNING or worse: the queue
    is written at once, so a process that logs little writes each line when it happens. `flush` writes
    the queue from the caller; `close` (logging.shutdown, at exit) stops the thread and writes the rest.
    Lines queued when the process is killed (SIGKILL) are lost: at most `interval` of them.
    """

    def __init__(self, stream: TextIO, interval: float = WRITE_INTERVAL) -> None:
        super().__init__()
        self.stream = stream
        self.interval = interval
        self._queue: collections.deque[logging.LogRecord] = collections.deque()
        self._written = 0.0  # time.monotonic() of the last write
        self._start()
        _writers.add(self)

    def _start(self) -> None:
        self._queue.clear()  # in a forked child: the parent writes what it queued
        self._writing = threading.RLock()  # (reentrant: a line about a failed write is queued meanwhile)
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # logging.Handler.handle takes the handler's lock around emit: not needed to append to a deque.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.args:
                record.msg, record.args = record.getMessage(), None
            if record.exc_info and not record.exc_text and self.formatter is not None:
                record.exc_text = self.formatter.formatException(record.exc_info)  # as it is now
        except Exception:
            self.handleError(record)
            return
        self._queue.append(record)
        # Quiet: nothing written for longer than the thread's turn takes (which a busy process is not).
        if record.levelno >= logging.WARNING or time.monotonic() - self._written >= 2 * self.interval:
            self.flush()

    def flush(self) -> None:
        """Write everything queued so far, formatted, in one call."""
        with self._writing:
            lines = []
            while self._queue:
                record = self._queue.popleft()
                try:
                    lines.append(self.format(record))
                except Exception:
                    self.handleError(record)
            if lines:
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except Exception:
                    self.handleError(record)
            self._written = time.monotonic()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self.interval)
            if self._queue:
                self.flush()

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()
        super().close()


# Every live LineWriter, restarted in a forked worker (WEB_CONCURRENCY), which has the handlers but
# not their threads, nor locks it can trust.
_writers: weakref.WeakSet[LineWriter] = weakref.WeakSet()


def _after_fork() -> None:
    for writer in list(_writers):
        if not writer._stopped:
            writer._start()


os.register_at_fork(after_in_child=_after_fork)


def secrets_of(settings: Settings) -> list[str]:
    """What must never be written: the token, the webhook secret, the database password."""
    found = [settings.bot_token or "", settings.webhook_secret]
    if settings.database_url:
        found.append(urlsplit(settings.database_url).password or "")
    return found


def setup_logging(settings: Settings) -> None:
    """One handler on the root logger, to stderr; uvicorn is run with log_config=None to use it too."""
    secrets = secrets_of(settings)
    if settings.webhook_secret_generated:
        # The local trial prints its one-time secret on purpose: it is how the user gets it.
        secrets.remove(settings.webhook_secret)
    handler = LineWriter(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if settings.log_format == "json" else TextFormatter(secrets))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, LineWriter):
            old.close()  # its thread, and what it has queued
    root.handlers[:] = [handler]
    # Fields no line shows, which every record would otherwise look up (the logging HOWTO's
    # "Optimization" table): the thread's and process's names and ids, and the calling function's file
    # and line (a walk up the stack per record). Tracebacks are unaffected.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    root.setLevel(settings.log_level)
    logging.captureWarnings(True)  # Python's warnings too, so every line is in the chosen format
    # httpx logs every request URL at INFO, and Bot API URLs contain the token (redacted all the same).
    logging.getLogger("httpx").setLevel(logging.WARNING)
