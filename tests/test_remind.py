"""The third example, examples/remind.py, through the webhook by its chat protocol, on both storages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest

from bot.storage import Storage
from bot.testing.chat import Chat
from bot.testing.env import UNPACED_ENV, make_settings
from bot.testing.fake_telegram import FakeTelegram
from examples.remind import build_bot, left, parse_duration

pytestmark = pytest.mark.anyio

OpenClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
GROUP, ANN, BOB = -100, 11, 22
WHAT, WHEN = "What should I remind you of?", "When? (like 30s, 10m, 2h)"


@pytest.fixture
def running(
    storage: Storage, database_url: str, telegram_root: str, open_client: OpenClient, fake: FakeTelegram
) -> Callable[..., AbstractAsyncContextManager[Chat]]:
    """`async with running(**build_bot_options) as chat`: the reminder bot behind the webhook; each use is
    a fresh start of the bot on the same storage."""

    @asynccontextmanager
    async def run(**options: Any) -> AsyncIterator[Chat]:
        async with open_client(
            make_settings(database_url, telegram_root, **UNPACED_ENV), build_bot(**options), storage
        ) as c:
            yield Chat(c, fake, chat=GROUP, sender=ANN)

    return run


async def test_a_reminder_is_asked_for_confirmed_and_sent_once_when_due(running: Any) -> None:
    async with running() as chat:
        assert await chat.say("/remind") == WHAT
        assert await chat.say("water the plants") == WHEN
        assert await chat.say("1s") == "OK, in 1s: water the plants"
        await chat.fake.wait_for_async(lambda: chat.said()[-1] == "⏰ water the plants")
        await asyncio.sleep(0.3)
        assert chat.said().count("⏰ water the plants") == 1
        assert await chat.say("/reminders") == "No reminders."


async def test_reminders_lists_the_pending_ones_one_per_line(running: Any) -> None:
    async with running() as chat:
        assert await chat.say("/remind call mum") == WHEN  # the first answer can come with the command
        assert await chat.say("2h") == "OK, in 2h: call mum"
        await chat.say("/remind", sender=BOB)
        await chat.say("stretch", sender=BOB)
        assert await chat.say("1h 30m", sender=BOB) == "OK, in 1h 30m: stretch"
        listing = (await chat.say("/reminders")).splitlines()
        assert [line.split(" (in ")[0] for line in listing] == ["stretch", "call mum"]
        assert listing[0].endswith("(in 1h 30m)") or listing[0].endswith("(in 1h 29m)")


async def test_cancel_and_a_duration_that_is_not_one(running: Any) -> None:
    async with running() as chat:
        assert await chat.say("/cancel") == "Nothing to cancel."
        await chat.say("/remind")
        await chat.say("tea")
        assert await chat.say("soon") == WHEN  # asked again
        assert await chat.say("/reminders") == "No reminders."  # a command is not an answer
        assert await chat.say("/cancel") == "Cancelled."
        assert await chat.say("/cancel") == "Nothing to cancel."


async def test_no_answer_for_the_dialogs_timeout_ends_it_with_never_mind(running: Any) -> None:
    async with running(dialog_timeout=1.0) as chat:
        await chat.say("/remind")
        await chat.fake.wait_for_async(lambda: chat.said()[-1] == "Never mind.")
        await chat.send(chat.message("tea"))
        await asyncio.sleep(0.3)
        assert chat.said() == [WHAT, "Never mind."]


async def test_a_reminder_due_while_the_bot_was_stopped_is_sent_once_when_it_starts(running: Any) -> None:
    async with running() as chat:
        await chat.say("/remind")
        await chat.say("stand up")
        assert await chat.say("1s") == "OK, in 1s: stand up"
    # Stopped before it was due: it is due while nothing runs.
    await asyncio.sleep(1.5)
    assert chat.said()[-1] == "OK, in 1s: stand up"
    async with running() as chat:
        await chat.fake.wait_for_async(lambda: chat.said()[-1] == "⏰ stand up")
        await asyncio.sleep(0.3)
        assert chat.said().count("⏰ stand up") == 1


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("2h", 7200),
        ("1d", 86400),
        ("1h 30m", 5400),
        (" 5M ", 300),
        ("1h30m", 5400),
    ],
)
def test_durations_as_people_write_them(written: str, seconds: float) -> None:
    assert parse_duration(written) == seconds


@pytest.mark.parametrize("written", ["soon", "10", "0s", "-5m", "5 minutes", "400d", "1.5h", ""])
def test_what_is_not_a_duration(written: str) -> None:
    assert parse_duration(written) is None


@pytest.mark.parametrize(("seconds", "shown"), [(0.4, "0s"), (45, "45s"), (570, "9m 30s"), (7500, "2h 5m")])
def test_time_left_is_short(seconds: float, shown: str) -> None:
    assert left(seconds) == shown
