"""Dialogs through the webhook, as Telegram drives them, on both storages and both transaction modes: a
three-step dialog advances once per answer however often each is delivered, two answers sent at once
take turns, /cancel ends it, and an unanswered one times out once, by a durable timer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from bot.context import BotIdentity, Context
from bot.dialogs import Dialog, State, StatesGroup, any_step
from bot.dispatch import Bot
from bot.filters import text
from bot.metrics import Metrics
from bot.pipeline import Pipeline
from bot.storage import Storage, StoredSession
from bot.storage.memory import MemoryStorage
from bot.testing.chat import Chat
from bot.testing.env import UNPACED_ENV, make_settings
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.updates import text_update

pytestmark = pytest.mark.anyio

OpenClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
GROUP, ANN, BOB = -100, 11, 22
# Short enough to wait for in the timeout tests, long enough for the steps before it on a busy machine.
TIMEOUT = 2.0


class Clock:
    now = 1_800_000_000.0

    def time(self) -> float:
        return self.now


class Signup(StatesGroup):
    name = State()
    age = State()
    city = State()


@dataclass
class Form:
    name: str = ""
    age: str = ""


def signup_bot(gate: asyncio.Event | None = None, timeout: float = 600.0) -> Bot[Any]:
    """/signup asks three questions; the answer to the first waits for `gate` when there is one."""
    bot: Bot[Any] = Bot(name="signup-bot")
    dialog: Dialog[Form] = Dialog(Signup, Form, timeout=timeout)

    @bot.command("signup")
    async def start(ctx: Context[Any]) -> None:
        await dialog.enter(ctx, Signup.name)
        ctx.reply("Your name?")

    @dialog.command("cancel", any_step)
    async def cancel(ctx: Context[Any]) -> None:
        (await dialog.state(ctx)).clear()
        ctx.reply("Cancelled.")

    @dialog.message(Signup.name, text())
    async def name(ctx: Context[Any]) -> None:
        if gate is not None:
            await gate.wait()
        state = await dialog.state(ctx)
        state.data.name = str(ctx.message and ctx.message.text)
        state.set(Signup.age)
        ctx.reply(f"{state.data.name}, your age?")

    @dialog.message(Signup.age, text())
    async def age(ctx: Context[Any]) -> None:
        state = await dialog.state(ctx)
        state.data.age = str(ctx.message and ctx.message.text)
        state.set(Signup.city)
        ctx.reply("Your city?")

    @dialog.message(Signup.city, text())
    async def city(ctx: Context[Any]) -> None:
        state = await dialog.state(ctx)
        ctx.reply(f"Signed up: {state.data.name}, {state.data.age}, {ctx.message and ctx.message.text}")
        state.clear()

    @dialog.on_timeout
    async def too_slow(ctx: Context[Any]) -> None:
        state = await dialog.state(ctx)
        assert ctx.timer is not None and state.current is not None
        ctx.reply(f"Too slow at {state.current.name}.")

    bot.include_router(dialog)
    return bot


@pytest.fixture
def talk(
    storage_mode: tuple[Storage, bool],
    database_url: str,
    telegram_root: str,
    open_client: OpenClient,
    fake: FakeTelegram,
) -> Callable[[Bot[Any]], AbstractAsyncContextManager[Chat]]:
    """`async with talk(bot) as chat`: the bot behind the webhook, on this run's storage and mode."""
    storage, optimistic = storage_mode
    settings = make_settings(
        database_url, telegram_root, DB_CONCURRENCY="optimistic" if optimistic else "locked", **UNPACED_ENV
    )

    @asynccontextmanager
    async def running(bot: Bot[Any]) -> AsyncIterator[Chat]:
        async with open_client(settings, bot, storage) as client:
            yield Chat(client, fake, chat=GROUP, sender=ANN)

    return running


async def quiet(chat: Chat, seconds: float = 0.3) -> list[str]:
    """What the bot said once it has had time to say more than it should."""
    await asyncio.sleep(seconds)
    return chat.said()


async def test_each_answer_advances_the_dialog_once_however_often_it_is_delivered(talk: Any) -> None:
    async with talk(signup_bot()) as chat:
        assert await chat.say("/signup") == "Your name?"
        for answer, question in (("Ann", "Ann, your age?"), ("33", "Your city?"), ("Oslo", None)):
            update = chat.message(answer)
            await chat.send(update)
            await chat.send(update)  # redelivered after it was applied
            await asyncio.gather(chat.send(update), chat.send(update))  # and two copies at once
            await chat.fake.wait_for_async(lambda q=question: chat.said()[-1] == q or q is None)
        await chat.fake.wait_for_async(lambda: chat.said()[-1].startswith("Signed up"))
        assert await quiet(chat) == [
            "Your name?",
            "Ann, your age?",
            "Your city?",
            "Signed up: Ann, 33, Oslo",
        ]


async def test_two_answers_sent_at_once_take_turns(talk: Any) -> None:
    gate = asyncio.Event()
    async with talk(signup_bot(gate)) as chat:
        assert await chat.say("/signup") == "Your name?"
        first, second = chat.message("Ann"), chat.message("33")
        # The first answer holds the dialog's row while its handler waits; the second queues behind it.
        sending = asyncio.gather(chat.send(first), chat.send(second))
        await asyncio.sleep(0.2)
        gate.set()
        await sending
        await chat.fake.wait_for_async(lambda: len(chat.said()) == 3)
        # Whichever came first was the name, the other the age: the second answer saw the first's step.
        name = chat.said()[1].removesuffix(", your age?")
        assert name in ("Ann", "33")
        assert chat.said()[2] == "Your city?"
        assert await chat.say("Oslo") == f"Signed up: {name}, {'33' if name == 'Ann' else 'Ann'}, Oslo"
        assert len(await quiet(chat)) == 4


async def test_cancel_ends_the_dialog_and_its_timeout(talk: Any) -> None:
    async with talk(signup_bot(timeout=TIMEOUT)) as chat:
        await chat.say("/signup")
        await chat.say("Ann")
        assert await chat.say("/cancel") == "Cancelled."
        await chat.send(chat.message("33"))  # no dialog: not an answer
        # Bob's dialog, begun after Ann's cancel, times out after Ann's would have: once his has, hers
        # (due first, picked no later) would have said so too, instead of waiting out her timeout thrice.
        assert await chat.say("/signup", sender=BOB) == "Your name?"
        await chat.fake.wait_for_async(lambda: chat.said()[-1] == "Too slow at Signup:name.")
        assert await quiet(chat, 0.5) == [
            "Your name?",
            "Ann, your age?",
            "Cancelled.",
            "Your name?",
            "Too slow at Signup:name.",
        ]


async def test_an_unanswered_dialog_ends_once_when_its_last_step_times_out(talk: Any) -> None:
    async with talk(signup_bot(timeout=TIMEOUT)) as chat:
        await chat.say("/signup")
        assert await chat.say("Ann") == "Ann, your age?"  # a step: the timeout starts again
        await chat.fake.wait_for_async(lambda: chat.said()[-1] == "Too slow at Signup:age.")
        await chat.send(chat.message("33"))  # too late: the dialog is over
        assert await quiet(chat) == ["Your name?", "Ann, your age?", "Too slow at Signup:age."]


async def test_people_in_one_chat_each_have_their_own_dialog(talk: Any) -> None:
    async with talk(signup_bot()) as chat:
        await chat.say("/signup", sender=ANN)
        await chat.say("/signup", sender=BOB)
        assert await chat.say("Ann", sender=ANN) == "Ann, your age?"
        assert await chat.say("Bob", sender=BOB) == "Bob, your age?"
        assert await chat.say("/cancel", sender=BOB) == "Cancelled."
        assert await chat.say("33", sender=ANN) == "Your city?"


def test_a_dialog_refuses_states_of_another_and_a_second_dialog_of_the_same_name() -> None:
    class Other(StatesGroup):
        step = State()

    dialog: Dialog[Form] = Dialog(Signup, Form)
    with pytest.raises(ValueError, match="are not its steps"):
        dialog.message(Other.step)
    bot: Bot[Any] = Bot()
    bot.include_router(dialog)
    with pytest.raises(ValueError, match="another dialog named 'Signup'"):
        bot.include_router(Dialog(Signup, Form))


async def test_a_dialog_at_a_step_the_code_no_longer_has_ends_at_its_timeout_without_the_handler() -> None:
    clock = Clock()
    storage = MemoryStorage(clock=clock)
    run = Pipeline(signup_bot(timeout=60), storage, BotIdentity(1, "signup_bot"), Metrics())
    await run.process(text_update(1, GROUP, "/signup", from_id=ANN))
    key = f"dialog:Signup:{GROUP}/{ANN}"
    async with storage.transaction() as tx:  # a deploy renamed the step since
        await tx.read(key)
        await tx.write(key, StoredSession('{"state": "Signup:gone", "data": {"name": "", "age": ""}}'))
    clock.now += 60
    [timer] = await storage.claim_due_timers(1, 10, 30.0)
    assert (await run.fire(timer)).to_send == []  # no "Too slow at …": there is no such step
    async with storage.transaction() as tx:
        assert await tx.read(key) is None
