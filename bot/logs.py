"""Logging for the whole process, uvicorn's lines included: readable text by default, or one JSON
object per line (LOG_FORMAT=json) for a log service.

A JSON line has time, level, logger and message, plus update_id, chat, outcome and duration (seconds)
when the line is about one update or one reply, and error with the traceback when there is one. Every
line, in either format, has the bot token, the webhook secret, the metrics token and the database
passwords (of both URLs, and PGPASSWORD) replaced by "***" before it is written: a secret that reaches a
log line by way of an exception's text (a URL, a DSN) is still not written. One shorter than
MASKED_ANYWHERE characters is replaced only where it stands as a value (a URL's password, `password=`,
`secret_token: `), so that WEBHOOK_SECRET=s does not mask every "s" of every line.

Each update (and each timer fire) gets a line (`LinesPerSecond`): every one at DEBUG; at INFO, the
default, the first LINES_PER_SECOND of each second, and one line a second counting the rest by outcome.
A line per update, even queued to a writer thread as below, made a busy process execute 7.0% more
instructions per update than at WARNING; with the limit, 0.85% (bench/README.md). A laptop's trial, a
few updates a second, still sees each one.

Lines cost little anyway: the caller only queues the record (the per-update line, `log_update`, only its
parts, with no record at all when nothing else would see it); a writer thread formats the queue and
writes it in one call every WRITE_INTERVAL, and records leave out the thread, process and caller fields
no line shows. A quiet process's lines, and every WARNING or worse, are written at once; the queue is
written out at exit (logging.shutdown) and before a forked worker leaves.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TextIO
from urllib.parse import unquote, urlsplit

from .config import Settings

__all__ = [
    "JsonFormatter",
    "LineWriter",
    "LinesPerSecond",
    "TextFormatter",
    "log_update",
    "secrets_of",
    "setup_logging",
]

# How long a line may wait in the queue while the process is busy (each wait, one write of them all).
WRITE_INTERVAL = 0.05

# At INFO, how many updates (or timer fires) a second get a line each; the rest are counted, in one line.
LINES_PER_SECOND = 10

# The `extra=` fields the framework attaches to a record, in the order a JSON line shows them.
FIELDS = ("update_id", "chat", "outcome", "duration")


# A secret this long is replaced wherever it occurs: such a string does not turn up in a line by chance (at
# worst it is a word, then masked too). A shorter one (WEBHOOK_SECRET=s, a database password `bot`, which
# Telegram and PostgreSQL accept) would turn every "s" or "bot" of every line into ***: it is replaced
# only where it stands as a value (`_BEFORE_VALUE`), which is where a line carries it, in a URL or a DSN.
MASKED_ANYWHERE = 8

# Where a value stands: after a URL's `://user:`, or after a key naming a secret (password, PGPASSWORD,
# secret, WEBHOOK_SECRET, secret_token, the X-Telegram-Bot-Api-Secret-Token header) and = or :, quoted
# or not (\" inside a JSON line); and up to the value's end.
_KEYS = ("password", "secret", "token")
_BEFORE_VALUE = rf"""(://[^\s/?#@:]*:|(?i:{"|".join(_KEYS)})(?:\\?['"])?\s*[:=]\s*(?:\\?['"])?)"""
_AFTER_VALUE = r"""(?=[\s'"\\&,;)}\]@]|$)"""


class _Redacting(logging.Formatter):
    point = ","  # between the seconds and the milliseconds

    def __init__(self, secrets: Iterable[str], fmt: str | None = None) -> None:
        super().__init__(fmt)
        # Longest first, so a secret containing another is replaced whole.
        found = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._secrets = [s for s in found if len(s) >= MASKED_ANYWHERE]
        short = [re.escape(s) for s in found if len(s) < MASKED_ANYWHERE]
        self._as_value = re.compile(f"{_BEFORE_VALUE}(?:{'|'.join(short)}){_AFTER_VALUE}") if short else None
        self._second = -1  # the whole second last formatted, and its text: one strftime per second
        self._second_text = ""

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        if self._as_value is not None and self._may_hold_a_value(text):
            text = self._as_value.sub(r"\1***", text)
        return text

    @staticmethod
    def _may_hold_a_value(text: str) -> bool:
        # What the expression needs, looked for first: an update's line has none, 0.5 µs to see it, where
        # the expression tried at each of its characters took 3.7 µs.
        if "://" in text:
            return True
        lower = text.lower()
        return any(key in lower for key in _KEYS)

    def _seconds(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second_text = self.second_text(second)
            self._second = second
        return self._second_text

    def second_text(self, second: int) -> str:
        raise NotImplementedError

    def line(self, created: float, level: str, name: str, message: str, fields: Mapping[str, object]) -> str:
        """A line without a traceback, from its parts: what `format` writes for a record with these."""
        raise NotImplementedError

    def _millis(self, created: float) -> str:
        # The second's text, and the milliseconds as LogRecord.msecs counts them.
        return f"{self._seconds(created)}{self.point}{int((created - int(created)) * 1000):03d}"


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
        return self.line(record.created, record.levelname, record.name, record.message, record.__dict__)

    def line(self, created: float, level: str, name: str, message: str, fields: Mapping[str, object]) -> str:
        return self.redact(f"{self._millis(created)} {level} {name}: {message}")


class JsonFormatter(_Redacting):
    def __init__(self, secrets: Iterable[str]) -> None:
        # Each also as json.dumps writes it inside the line, where a quote or a backslash in a password
        # (PGPASSWORD takes any characters) is escaped: the line is redacted once made.
        secrets = list(secrets)
        super().__init__([*secrets, *(json.dumps(s, ensure_ascii=False)[1:-1] for s in secrets)])

    def second_text(self, second: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))

    point = "."

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        fields = record.__dict__
        if record.exc_text:
            fields = {**fields, "error": record.exc_text}
        return self.line(record.created, record.levelname, record.name, record.getMessage(), fields)

    def line(self, created: float, level: str, name: str, message: str, fields: Mapping[str, object]) -> str:
        line: dict[str, object] = {
            "time": self._millis(created) + "Z",
            "level": level,
            "logger": name,
            "message": message,
        }
        for field in (*FIELDS, "error"):
            value = fields.get(field)
            if value is not None:
                line[field] = value
        return self.redact(json.dumps(line, ensure_ascii=False, default=str))


# A per-update line without its LogRecord: created (time.time()), logger name, message, its arguments,
# the fields. Made only when nothing but a LineWriter would see the record (`log_update`).
_Line = tuple[float, str, str, tuple[object, ...], dict[str, object]]

UPDATE_LINE = "update %d: %s in %.1f ms"


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
        self._queue: collections.deque[logging.LogRecord | _Line] = collections.deque()
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
        self._queued(record, record.levelno)

    def queue_line(self, line: _Line) -> None:
        """A line for which no LogRecord is made (see `log_update`): formatted by the writer's thread."""
        self._queued(line, logging.INFO)

    def _queued(self, entry: logging.LogRecord | _Line, level: int) -> None:
        self._queue.append(entry)
        # Quiet: nothing written for longer than the thread's turn takes (which a busy process is not).
        if level >= logging.WARNING or time.monotonic() - self._written >= 2 * self.interval:
            self.flush()

    def _format(self, entry: logging.LogRecord | _Line) -> str:
        if isinstance(entry, logging.LogRecord):
            return self.format(entry)
        created, name, msg, args, fields = entry
        if isinstance(self.formatter, _Redacting):
            return self.formatter.line(created, "INFO", name, msg % args, fields)
        # Another formatter was set since: the record the line stands for.
        record = logging.makeLogRecord({**fields, "name": name, "msg": msg, "args": args, "created": created})
        record.levelno, record.levelname = logging.INFO, "INFO"
        return self.format(record)

    def flush(self) -> None:
        """Write everything queued so far, formatted, in one call."""
        with self._writing:
            lines = []
            while self._queue:
                entry = self._queue.popleft()
                try:
                    lines.append(self._format(entry))
                except Exception:
                    if isinstance(entry, logging.LogRecord):
                        self.handleError(entry)
            if lines:
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except Exception:
                    self.handleError(logging.makeLogRecord({"msg": lines[-1]}))
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


# Every live LineWriter: a forked worker (WEB_CONCURRENCY) gets the handlers but not their threads. Each
# one's lock is held across the fork, so that no writer thread is inside a write (holding the stream's
# own lock, which the child could then never take); the child starts a thread and a lock of its own.
_writers: weakref.WeakSet[LineWriter] = weakref.WeakSet()
_forking: list[LineWriter] = []


def _before_fork() -> None:
    _forking[:] = [writer for writer in _writers if not writer._stopped]
    for writer in _forking:
        writer._writing.acquire()


def _after_fork_in_parent() -> None:
    for writer in _forking:
        writer._writing.release()
    _forking.clear()


def _after_fork_in_child() -> None:
    for writer in _forking:
        writer._start()
    _forking.clear()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)


def log_update(
    logger: logging.Logger, update_id: int, chat: int | None, outcome: str, seconds: float
) -> None:
    """An update's line (`update 85: applied in 3.1 ms`, with update_id, chat, outcome and duration),
    written when `LinesPerSecond.allow` says so. When the only handler it would reach is the LineWriter
    of `setup_logging` (no other handler or filter on the way, the standard record factory), the line is
    queued as its parts and the writer's thread formats it: the same line, for ~1 µs here instead of a
    LogRecord's ~6 µs. Otherwise (a test's caplog, a handler of the user's) it is logged as a record like
    any other line."""
    fields: dict[str, object] = {
        "update_id": update_id,
        "chat": chat,
        "outcome": outcome,
        "duration": round(seconds, 6),
    }
    args = (update_id, outcome, seconds * 1000)
    writer = _sole_writer(logger)
    if writer is None:
        logger.info(UPDATE_LINE, *args, extra=fields)
    else:
        writer.queue_line((time.time(), logger.name, UPDATE_LINE, args, fields))


class LinesPerSecond:
    """How many lines of one kind (an update's, a timer fire's) a process writes: at DEBUG, one for each;
    at INFO the first `per_second` of each whole second of `clock` (time.monotonic: its seconds need not
    start where the lines' timestamps do), then one line when the second is over, counting the rest by
    outcome (`update lines: 3802 more this second: 3000 applied, 802 ignored`), written by the next call
    of a later second or by a timer of the running event loop when none comes. Past the limit a line
    costs a clock read and a count. `flush` writes a pending count now (shutdown).

        if lines.allow(outcome):
            log_update(logger, ...)
    """

    def __init__(
        self,
        logger: logging.Logger,
        kind: str,
        per_second: int = LINES_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.kind = kind
        self.per_second = per_second
        self._clock = clock
        self._second = -1  # the clock's whole second that the counts below belong to
        self._written = 0  # lines written in it
        self._held: collections.Counter[str] = collections.Counter()  # outcome: how many got no line
        self._timer: asyncio.TimerHandle | None = None

    def allow(self, outcome: str) -> bool:
        """Whether this line is to be written; if not, it is counted (False also below INFO)."""
        if not self.logger.isEnabledFor(logging.INFO):
            return False
        now = self._clock()
        second = int(now)
        if second != self._second:
            self.flush()
            self._second, self._written = second, 0
        if self._written < self.per_second or self.logger.isEnabledFor(logging.DEBUG):
            self._written += 1
            return True
        self._held[outcome] += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return False  # (no loop: the next call in a later second writes the count)
            self._timer = loop.call_later(second + 1 - now, self._second_over)
        return False

    def _second_over(self) -> None:
        self._timer = None
        if int(self._clock()) == self._second:
            # (A loop's timer may fire a little early: uvloop's count whole milliseconds.)
            self._timer = asyncio.get_running_loop().call_later(0.001, self._second_over)
            return
        self.flush()

    def flush(self) -> None:
        """Write the count of lines not written, if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._held:
            return
        held = self._held.most_common()
        self._held = collections.Counter()
        self.logger.info(
            "%s lines: %d more this second: %s (LOG_LEVEL=DEBUG writes one for each)",
            self.kind,
            sum(count for _, count in held),
            ", ".join(f"{count} {outcome}" for outcome, count in held),
        )


def _sole_writer(logger: logging.Logger) -> LineWriter | None:
    """The root's LineWriter, if a record of `logger` at INFO would reach it and nothing else."""
    root = logging.root
    if len(root.handlers) != 1 or root.filters or logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    writer = root.handlers[0]
    if not isinstance(writer, LineWriter) or writer.filters or writer.level > logging.INFO:
        return None
    node: logging.Logger | None = logger
    while node is not None and node is not root:
        if node.handlers or node.filters or not node.propagate:
            return None
        node = node.parent
    return writer


def secrets_of(settings: Settings) -> list[str]:
    """What must never be written: the token, the webhook secret, the metrics token, the database
    passwords (in either URL, or in PGPASSWORD). A URL's password as written there and decoded: asyncpg and
    PostgreSQL use `p@ss` of `p%40ss`, and their errors (or a repr of the connection's arguments) write it so."""
    found = [settings.bot_token or "", settings.webhook_secret, settings.metrics_token or ""]
    found.append(settings.pgpassword or "")
    for url in (settings.database_url, settings.database_direct_url):
        password = urlsplit(url).password if url else None
        if password:
            found += [password, unquote(password)]
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
