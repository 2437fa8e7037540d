"""Which failures are transient, and for how long one update may keep failing so: pure, no I/O.

A failure is transient when delivering the update again may succeed: the database away or slow
(`StorageUnavailable`: unreachable, a lock, statement or pool timeout), the request's deadline, or
Telegram away or slow during a handler's `ctx.api` call (a `BotApiError` worth retrying, a timeout). The
update is not applied and the webhook answers 503, so Telegram delivers it again.

Everything else is deterministic: an exception from the bot's own code (a filter, key function,
middleware, handler, error hook, `initial`, a merge), a session value that cannot be encoded or decoded,
a value the database refuses (`StorageRefused`). Delivering the update again fails the same way, so the
pipeline rolls it back and records it as a dead letter instead (docs/RELIABILITY.md).

A transient failure that repeats is no longer transient for its chat: Telegram holds the chat's later
updates behind it for up to 24 hours. `TransientFailures` counts each update's transient failures in this
process and says when to stop waiting for it.
"""

from __future__ import annotations

import asyncio
import traceback
from dataclasses import dataclass

from .errors import BotError, ControlFlow
from .storage import DeadLetter, StorageUnavailable
from .telegram import BotApiError
from .types import Update

__all__ = [
    "Failures",
    "StrayBaseException",
    "TransientFailures",
    "TryLater",
    "as_failure",
    "dead_letter",
    "describe",
    "is_transient",
    "storable",
]


class TryLater(BotError):
    """The update could not be applied now, for a reason that may pass: answer 503 (webhook) or ask again
    (poll), and Telegram delivers it again. Nothing of it was written."""


class StrayBaseException(BotError):
    """The bot's code raised a BaseException that is no Exception (its `__cause__`; the framework's own
    ControlFlow too, where the framework raises none: `as_failure`): a bug like any other, so its update
    is recorded as a dead letter rather than let out of the pipeline, where it was a 500 on every
    delivery, stopped `poll`, and from a timer's fire stopped the whole process."""

    def __init__(self, error: BaseException) -> None:
        said = _said(error)
        super().__init__(f"the bot's code raised {type(error).__name__}" + (f": {said}" if said else ""))
        self.__cause__ = error


def as_failure(error: BaseException, *, steered: bool = False) -> Exception | None:
    """What an update failed of, as an Exception: `error` itself, or a StrayBaseException around what
    the bot's code raised that is no Exception (SystemExit, KeyboardInterrupt, GeneratorExit, a class of
    its own, a CancelledError from awaiting something another task cancelled). None for what must go on
    up: the cancellation of the task itself (a shutdown, the deadline) or the closing of its coroutine
    (a GeneratorExit thrown in at the caller's own await), and the framework's control flow
    where the framework steers the code that raised it (`steered`: an optimistic attempt).

    Anywhere else (an attempt with locks, a filter, the error hook after a rollback) the framework raises
    no ControlFlow, so one there is the bot's: a Conflict it caught in an optimistic attempt and raised
    again, or one it made itself. Let on up, it left the pipeline on every delivery (a 500)."""
    if isinstance(error, Exception):
        return error
    if isinstance(error, ControlFlow) and steered:
        return None
    if isinstance(error, GeneratorExit) and error.__traceback__ and error.__traceback__.tb_next is None:
        # Raised at the await of the frame that caught it, not in the bot's code below: `close()` of this
        # coroutine (a task abandoned pending, collected, or its loop closed without cancelling it),
        # which closes the bot's coroutine first and then throws GeneratorExit into each frame up the
        # chain. Nothing failed, and a coroutine being closed can await nothing more: no error hook,
        # no dead letter, nor a log blaming the bot's code. (One the bot's code raises passed its frames.)
        return None
    if isinstance(error, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is None or task.cancelling():
            return None
    return StrayBaseException(error)


def is_transient(error: BaseException) -> bool:
    if isinstance(error, StorageUnavailable | TimeoutError):
        return True
    return isinstance(error, BotApiError) and not error.permanent


@dataclass(slots=True)
class Failures:
    count: int
    first: float  # when the first one happened (the clock's seconds)


class TransientFailures:
    """Each update's transient failures in this process: an update is given up on (the caller records it
    as a dead letter) at its `deliveries`-th failure, once `seconds` have passed since its first.

    Both conditions, so that neither a burst of fast retries nor one old failure gives up on an update
    that a short outage delayed. Kept in memory, since the database may be what is failing: across P
    processes that share the deliveries, an update may fail up to P times `deliveries` before one of them
    gives up; a restart starts counting afresh. At most `size` updates are tracked, the oldest dropped.
    """

    def __init__(self, deliveries: int, seconds: float, *, size: int = 10_000) -> None:
        self.deliveries = deliveries
        self.seconds = seconds
        self._size = size
        self._failures: dict[int, Failures] = {}

    def failed(self, update_id: int, now: float) -> Failures | None:
        """Count a transient failure of the update; the count so far when it is time to give up on it
        (and it is forgotten), else None."""
        failures = self._failures.get(update_id)
        if failures is None:
            failures = self._failures[update_id] = Failures(0, now)
            if len(self._failures) > self._size:
                del self._failures[next(iter(self._failures))]  # the oldest: dicts keep insertion order
        failures.count += 1
        if failures.count >= self.deliveries and now - failures.first >= self.seconds:
            del self._failures[update_id]
            return failures
        return None

    def succeeded(self, update_id: int) -> None:
        if self._failures:  # the common case, nothing failing, costs one truth test
            self._failures.pop(update_id, None)


def _said(error: BaseException) -> str:
    """The error's message. Its `__str__` is the bot's code (or a library's) and may fail, here where the
    failure is being recorded: the placeholder is traceback's own."""
    try:
        return str(error)
    except Exception:
        return "<str() failed>"


def describe(error: BaseException, limit: int = 500) -> str:
    """The error in one line of at most `limit` characters: its type and the first line of its message."""
    lines = _said(error).strip().splitlines()
    line = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def storable(text: str) -> str:
    """Text any storage keeps as it is: NUL (which PostgreSQL refuses in text) and lone surrogates (which
    cannot be encoded as UTF-8) written as escapes. What a dead letter records came from the update that
    failed, and may hold exactly what made it fail."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def dead_letter(update: Update, error: BaseException, attempts: int, line: str | None = None) -> DeadLetter:
    """What to record of an update that failed for good: as received (`Update.raw`), with the error (in
    one `line`, by default its own) and its traceback."""
    chat = update.chat
    return DeadLetter(
        update_id=update.update_id,
        body=storable(update.raw.decode("utf-8", "replace")),
        error=storable(describe(error) if line is None else line),
        traceback=storable("".join(traceback.format_exception(error))),
        chat=None if chat is None else str(chat.id),
        kind=update.kind,
        attempts=attempts,
    )
