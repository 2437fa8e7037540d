"""Which failures are transient, when an update failing transiently is given up on, and what a dead
letter records: pure rules, no storage."""

from __future__ import annotations

import json
import types
from collections.abc import Generator

import msgspec
import pytest

from bot.failures import (
    StrayBaseException,
    TransientFailures,
    as_failure,
    dead_letter,
    describe,
    is_transient,
    storable,
)
from bot.session import SessionDecodeError
from bot.storage import StorageRefused, StorageUnavailable
from bot.telegram import BotApiError, decode_update
from bot.testing.updates import encode, message_update, text_update


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (StorageUnavailable("lock timeout"), True),
        (TimeoutError(), True),  # the request's deadline, or a handler's own wait
        (BotApiError("getChatMember", "Bad Gateway", 502), True),
        (BotApiError("getChatMember", "Too Many Requests", 429, retry_after=3), True),
        (BotApiError("getChatMember", "connection reset"), True),  # no answer at all
        (BotApiError("getChatMember", "Bad Request: chat not found", 400), False),
        (StorageRefused("jsonb refused \\u0000"), False),
        (SessionDecodeError("session '7' does not decode"), False),
        (ValueError("invalid literal for int()"), False),
        (msgspec.EncodeError("Encoding objects of type object is unsupported"), False),
        (RuntimeError("a bug"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_only_failures_that_may_pass_are_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_an_update_is_given_up_on_at_its_nth_failure_once_enough_time_has_passed() -> None:
    failures = TransientFailures(deliveries=3, seconds=60)
    assert [failures.failed(7, at) for at in (0, 1, 2)] == [None, None, None]  # 3 failures, 2 s
    assert failures.failed(7, 59) is None  # 4 failures, 59 s
    given_up = failures.failed(7, 60)
    assert given_up is not None and (given_up.count, given_up.first) == (5, 0)
    assert failures.failed(7, 61) is None  # forgotten once given up on: counting starts again


def test_a_success_forgets_the_failures_and_other_updates_count_apart() -> None:
    failures = TransientFailures(deliveries=2, seconds=0)
    assert failures.failed(1, 0) is None
    assert failures.failed(2, 0) is None
    failures.succeeded(1)
    assert failures.failed(1, 1) is None  # counting afresh after the success
    assert failures.failed(2, 1) is not None


def test_only_the_latest_updates_are_tracked() -> None:
    failures = TransientFailures(deliveries=2, seconds=0, size=2)
    for update_id in (1, 2, 3):
        assert failures.failed(update_id, 0) is None
    assert failures.failed(1, 1) is None  # the oldest was dropped: its count restarted
    assert failures.failed(3, 1) is not None


def test_describe_is_one_line_of_bounded_length() -> None:
    assert describe(ValueError("first\nsecond")) == "ValueError: first"
    assert describe(TimeoutError()) == "TimeoutError"
    assert len(describe(ValueError("x" * 1000), limit=50)) == 50


class NoMessage(Exception):
    """A library's exception whose message is looked up, and not found."""

    def __str__(self) -> str:
        raise KeyError("no message for code 7")


class NotAString(Exception):
    def __str__(self) -> str:
        return 7  # type: ignore[return-value]


@pytest.mark.parametrize("error", [NoMessage(), NotAString()], ids=lambda e: type(e).__name__)
def test_describe_survives_an_exception_whose_str_fails(error: Exception) -> None:
    """describe() raised str()'s own error, out of the dead letter's recording: the update escaped the
    pipeline (500 on every delivery) with no error hook, and with one it was recorded as that error."""
    assert describe(error) == f"{type(error).__name__}: <str() failed>"
    assert (
        "<exception str() failed>"
        in dead_letter(decode_update(encode(message_update(1, -7, "x"))), error, 1).traceback
    )


def test_what_a_dead_letter_records_can_always_be_stored() -> None:
    assert storable("a\x00b \ud800 🍕") == "a\\x00b \\ud800 🍕"
    try:
        raise ValueError("text with \x00 in it")
    except ValueError as exc:
        error = exc
    raw = message_update(3, -7, "x", extra={"field_from_a_newer_bot_api": 1}).json()
    letter = dead_letter(decode_update(encode(raw)), error, attempts=2)
    assert (letter.update_id, letter.chat, letter.kind, letter.attempts) == (3, "-7", "message", 2)
    assert json.loads(letter.body) == raw  # what was received, not only what was decoded
    assert letter.error == "ValueError: text with \\x00 in it"
    assert "\x00" not in letter.traceback and "raise ValueError" in letter.traceback
    again = dead_letter(text_update(3, -7, "x"), error, attempts=1, line="gave up: why")
    assert json.loads(again.body)["message"]["text"] == "x" and again.error == "gave up: why"


@types.coroutine
def _waiting() -> Generator[None, None, None]:
    yield  # where a handler waits (a reply, a lock) when its task is abandoned


async def _handler(raises: bool) -> None:
    if raises:
        raise GeneratorExit  # the bot's own code raising one: a bug like any other
    await _waiting()


async def _pipeline(raises: bool, failures: list[Exception | None]) -> None:
    """What the pipeline does around the bot's code: what it raised, as_failure says what to do with."""
    try:
        await _handler(raises)
    except BaseException as caught:
        failures.append(as_failure(caught))
        raise


def test_a_coroutine_closed_while_it_awaits_the_bots_code_is_not_the_bots_failure() -> None:
    # close() (of a task abandoned pending, or left when its loop closed) throws GeneratorExit into each
    # frame: taken for the bot's, it called the error hook and blamed the bot's code in the log, from a
    # coroutine that could await nothing more.
    closed: list[Exception | None] = []
    coroutine = _pipeline(False, closed)
    coroutine.send(None)
    coroutine.close()
    assert closed == [None]
    raised: list[Exception | None] = []
    with pytest.raises(GeneratorExit):
        _pipeline(True, raised).send(None)
    [failure] = raised
    assert isinstance(failure, StrayBaseException) and isinstance(failure.__cause__, GeneratorExit)
