"""Filters combine with & | ~, sync or async, and short-circuit like `and`/`or`."""

from __future__ import annotations

from typing import Any

import pytest

from bot.context import BotIdentity, Context
from bot.filters import Filter, chat_type, command, data_startswith, from_user, text
from bot.telegram import decode_update
from bot.testing.updates import callback_update, encode, message_update

pytestmark = pytest.mark.anyio


def ctx(raw: dict[str, Any]) -> Context[Any]:
    return Context(decode_update(encode(raw)), BotIdentity(1, "todo_bot"))


def recorder(result: bool, seen: list[str], name: str) -> Filter:
    def check(c: Context[Any]) -> bool:
        seen.append(name)
        return result

    return Filter(check)


async def is_true(c: Context[Any]) -> bool:
    return True


@pytest.mark.parametrize(
    ("combined", "expected", "evaluated"),
    [
        (lambda s: recorder(True, s, "a") & recorder(False, s, "b"), False, ["a", "b"]),
        (lambda s: recorder(False, s, "a") & recorder(True, s, "b"), False, ["a"]),
        (lambda s: recorder(True, s, "a") | recorder(False, s, "b"), True, ["a"]),
        (lambda s: recorder(False, s, "a") | recorder(True, s, "b"), True, ["a", "b"]),
        (lambda s: ~recorder(True, s, "a"), False, ["a"]),
        (lambda s: ~(recorder(False, s, "a") | recorder(False, s, "b")), True, ["a", "b"]),
        (lambda s: (lambda c: s.append("plain") or True) & recorder(True, s, "b"), True, ["plain", "b"]),
        (lambda s: recorder(True, s, "a") & is_true, True, ["a"]),
        (lambda s: ~Filter(is_true), False, []),
    ],
)
async def test_combinations(combined: Any, expected: bool, evaluated: list[str]) -> None:
    seen: list[str] = []
    assert await combined(seen)(ctx(message_update(1, -1, "x"))) is expected
    assert seen == evaluated


@pytest.mark.parametrize(
    ("check", "raw", "expected"),
    [
        (command("add"), message_update(1, -1, "/add milk"), True),
        (command("add", "new"), message_update(1, -1, "/new@todo_bot"), True),
        (command("add"), message_update(1, -1, "/add@other_bot milk"), False),
        (command("add"), message_update(1, -1, "add milk"), False),
        (text(equals="hi"), message_update(1, -1, "hi"), True),
        (text(contains="ll"), message_update(1, -1, "hello"), True),
        (text(startswith="he", contains="z"), message_update(1, -1, "hello"), False),
        (text(equals="hi"), message_update(1, -1, None, caption="hi"), False),
        (chat_type("group", "supergroup"), message_update(1, -1, "x"), True),
        (chat_type("private"), message_update(1, -1, "x"), False),
        (from_user(7), message_update(1, -1, "x", from_id=7), True),
        (from_user(7), message_update(1, -1, "x", kind="channel_post"), False),
        (data_startswith("done:"), callback_update(1, -1, 7, "done:3"), True),
        (data_startswith("done:"), callback_update(1, -1, 7, "undo:3"), False),
        (data_startswith("done:"), message_update(1, -1, "done:3"), False),
        (chat_type("supergroup"), callback_update(1, -1, 7, "x"), True),
    ],
)
async def test_builtin_filters(check: Filter, raw: dict[str, Any], expected: bool) -> None:
    assert await check(ctx(raw)) is expected


class FromUser(Filter):
    """A filter written as aiogram's are: a subclass whose own `__call__` answers, with no function."""

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id

    async def __call__(self, c: Context[Any]) -> bool:
        return c.from_user is not None and c.from_user.id == self.user_id


class Noted(Filter):
    """A subclass given a function, whose `__call__` adds to it: the override answers, not the function."""

    def __init__(self, seen: list[str]) -> None:
        super().__init__(lambda c: True)
        self.seen = seen

    async def __call__(self, c: Context[Any]) -> bool:
        self.seen.append("noted")
        return False


@pytest.mark.parametrize(
    ("combined", "expected", "evaluated"),
    [
        (lambda s: FromUser(7) & recorder(True, s, "b"), True, ["b"]),
        (lambda s: FromUser(8) & recorder(True, s, "b"), False, []),
        (lambda s: recorder(False, s, "a") | FromUser(7), True, ["a"]),
        (lambda s: ~FromUser(7), False, []),
        (lambda s: Noted(s) | recorder(True, s, "b"), True, ["noted", "b"]),
        (lambda s: ~Noted(s), True, ["noted"]),
    ],
)
async def test_a_subclass_overriding_call_answers_for_itself_in_combinations(
    combined: Any, expected: bool, evaluated: list[str]
) -> None:
    seen: list[str] = []
    assert await combined(seen)(ctx(message_update(1, -1, "x", from_id=7))) is expected
    assert seen == evaluated


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (lambda c: c.message, True),
        (lambda c: c.message.caption, False),
        (lambda c: 0, False),
        (lambda c: is_true(c), True),
    ],
)
async def test_an_answer_that_is_not_a_bool_is_taken_as_one_inside_combinations(
    answer: Any, expected: bool
) -> None:
    c = ctx(message_update(1, -1, "x"))
    assert await (Filter(answer) & Filter(lambda c: True))(c) is expected
    assert await (Filter(lambda c: False) | answer)(c) is expected
    assert await (~Filter(answer))(c) is (not expected)
