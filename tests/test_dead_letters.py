"""Dead letters (issue 16): a failure that every delivery would repeat costs its update, and nothing else.

The pipeline on both storages, the webhook in process on PostgreSQL, and `python -m bot dead-letters`,
`replay` and `poll` as processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from faulty_bot import FAILING_TEXTS, FILTER_DATA, build_broken, build_fixed
from test_failures import NoMessage

from bot.app import SECRET_HEADER
from bot.context import BotIdentity, Context
from bot.dead_letters import table
from bot.dispatch import Bot
from bot.failures import TransientFailures, TryLater
from bot.filters import text
from bot.metrics import Metrics
from bot.pipeline import Pipeline, Status
from bot.session import session
from bot.storage import Conflict, DeadLetter, Moved, Storage, StorageUnavailable
from bot.storage.memory import MemoryStorage
from bot.storage.postgres import PostgresStorage
from bot.telegram import Update, decode_update
from bot.testing.env import SECRET, TOKEN, bot_env, make_settings
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import interrupt, run_cli
from bot.testing.updates import callback_update, encode, message_update

pytestmark = pytest.mark.anyio

ME = BotIdentity(int(TOKEN.split(":")[0]), "test_bot")
OpenClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
# `--app faulty_bot:build_fixed` for the commands, which import it from here.
TESTS = str(Path(__file__).resolve().parent)


@dataclass
class Counted:
    count: int = 0


def update(raw: dict[str, Any]) -> Update:
    return decode_update(encode(raw))


def button_bot(hooked: list[str] | None = None) -> Bot[Counted]:
    """The issue's example: a filter that assumes every button's data is a number."""
    bot: Bot[Counted] = Bot(session(Counted))

    @bot.callback_query(lambda ctx: int(ctx.data or "") > 3)
    async def press(ctx: Context[Counted]) -> None:
        ctx.session.count += 1

    if hooked is not None:

        @bot.catch
        async def on_error(error: Exception, ctx: Context[Counted]) -> None:
            hooked.append(type(error).__name__)
            raise error

    return bot


def press(update_id: int, data: str, chat_id: int = -7) -> Update:
    return update(callback_update(update_id, chat_id, 5, data))


async def count(storage: Storage, key: str = "-7") -> int:
    async with storage.transaction() as tx:
        stored = await tx.read(key)
    assert not isinstance(stored, Moved)
    return 0 if stored is None else int(json.loads(stored.data)["count"])


# --- the pipeline, on both storages -----------------------------------------------------------------


async def test_a_filter_that_raises_is_a_dead_letter_recorded_as_received(storage: Storage) -> None:
    """Finding 2: filters ran outside the pipeline's failure handling, so the exception escaped
    `process` (HTTP 500 on every delivery; `poll` died) and the error hook never heard of it."""
    hooked: list[str] = []
    run = Pipeline(button_bot(hooked), storage, ME, Metrics())
    raw = callback_update(1, -7, 5, FILTER_DATA).json()
    body = json.dumps(raw, indent=1).encode()  # as received: kept byte for byte, not re-encoded
    outcome = await run.process(decode_update(body))
    assert (outcome.status, outcome.to_send, hooked) == (Status.DEAD_LETTER, [], ["ValueError"])
    [letter] = await storage.dead_letters(ME.id)
    assert (letter.update_id, letter.chat, letter.kind, letter.attempts) == (1, "-7", "callback_query", 1)
    assert letter.error == "ValueError: invalid literal for int() with base 10: 'oops'"
    assert letter.body == body.decode()
    assert "int(ctx.data" in letter.traceback  # the line of the filter that failed
    assert run.metrics.count("bot_updates_total", kind="callback_query", outcome="dead_letter") == 1
    assert (await run.process(press(2, "5"))).status is Status.APPLIED  # the chat moves on
    assert await count(storage) == 1


async def test_a_redelivered_dead_letter_runs_nothing_again_here_or_in_another_process(
    storage: Storage,
) -> None:
    hooked: list[str] = []
    first = Pipeline(button_bot(hooked), storage, ME, Metrics())
    assert (await first.process(press(1, FILTER_DATA))).status is Status.DEAD_LETTER
    assert (await first.process(press(1, FILTER_DATA))).status is Status.DUPLICATE  # from memory
    other = Pipeline(button_bot(hooked), storage, ME, Metrics())  # another process: no memory of it
    assert (await other.process(press(1, FILTER_DATA))).status is Status.DUPLICATE
    assert hooked == ["ValueError"]  # the error hook ran once, for the first delivery
    assert [d.attempts for d in await storage.dead_letters(ME.id)] == [1]


def plus_bot() -> Bot[Counted]:
    """A bot whose "+" adds 1 to its chat's count: the chat's next update, applied after the bad one. Each
    test adds the handler it is about."""
    bot: Bot[Counted] = Bot(session(Counted))

    @bot.message(text(equals="+"))
    async def plus(ctx: Context[Counted]) -> None:
        ctx.session.count += 1

    return bot


async def test_an_update_failing_transiently_again_and_again_becomes_a_dead_letter_at_the_bound(
    storage: Storage,
) -> None:
    """A handler that never finishes within the deadline: 503 (TryLater) until the bound, then a dead
    letter recorded within its own few seconds, and the chat's next update is applied."""
    stuck = asyncio.Event()
    bot = plus_bot()

    @bot.message(text(equals="slow"))
    async def slow(ctx: Context[Counted]) -> None:
        await stuck.wait()

    run = Pipeline(bot, storage, ME, Metrics(), deadline=0.3, give_up=TransientFailures(3, 0))
    slow_update = update(message_update(1, -7, "slow"))
    for _ in range(2):
        with pytest.raises(TryLater, match=r"no result within 0\.3 s"):
            await run.process(slow_update)
    assert await storage.dead_letters(ME.id) == []
    assert (await run.process(slow_update)).status is Status.DEAD_LETTER
    [letter] = await storage.dead_letters(ME.id)
    assert letter.attempts == 3
    assert re.fullmatch(r"gave up after 3 transient failures in \d+ s: no result within 0\.3 s", letter.error)
    assert "TimeoutError" in letter.traceback
    assert (await run.process(update(message_update(2, -7, "+")))).status is Status.APPLIED
    assert run.metrics.count("bot_updates_total", kind="message", outcome="unavailable") == 2


def stubborn_bot(released: asyncio.Event) -> Bot[Counted]:
    """plus_bot's, with "stubborn": it adds 100 and, with a bare `except:` in its retry loop, swallows
    its deadline's cancellation until `released` is set."""
    bot = plus_bot()

    @bot.message(text(equals="stubborn"))
    async def stubborn(ctx: Context[Counted]) -> None:
        ctx.session.count += 100
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # the deadline's, swallowed
                await released.wait()

    return bot


@pytest.mark.parametrize("optimistic", [False, True], ids=["locked", "optimistic"])
async def test_a_handler_that_swallows_its_deadline_holds_its_chat_only_until_the_bound(
    database_url: str, optimistic: bool
) -> None:
    """A bare `except:` in a handler's retry loop swallows the deadline's cancellation, and its delivery
    never ends. Each redelivery waited for it until its own deadline and answered 503, uncounted, for as
    long as it ran: its chat held for Telegram's 24 hours. Those waits are transient failures of the
    update now: a dead letter at the bound. The chat's next update is applied once the stuck attempt has
    held its key's turn in this process past any deadline (TURN_STUCK_AFTER: before, it waited for that
    turn, and answered 503, for as long as the attempt ran) and, with locks, the server has ended the
    stuck transaction (idle_in_transaction_session_timeout, 3 x DB_STATEMENT_TIMEOUT). The stuck attempt,
    when it ends at last, applies nothing."""
    released = asyncio.Event()
    bot = stubborn_bot(released)
    storage = await PostgresStorage.connect(database_url, statement_timeout=0.2)  # idle: ended after 0.6 s
    run = Pipeline(
        bot, storage, ME, Metrics(), optimistic=optimistic, deadline=0.3, give_up=TransientFailures(3, 0)
    )
    storage.turns.stuck_after = run.lock_turns.turns.stuck_after = 0.5  # (TURN_STUCK_AFTER, for 0.3 s)
    stuck = update(message_update(1, -7, "stubborn"))
    first = asyncio.ensure_future(run.process(stuck))
    try:
        for _ in range(2):
            with pytest.raises(TryLater, match=r"an earlier delivery of it is still running after 0\.3 s"):
                await asyncio.wait_for(run.process(stuck), 5)
        assert (await asyncio.wait_for(run.process(stuck), 10)).status is Status.DEAD_LETTER
        [letter] = await storage.dead_letters(ME.id)
        assert re.fullmatch(
            r"gave up after 3 transient failures in \d+ s: .*still running after 0\.3 s", letter.error
        )
        assert (await run.process(update(message_update(2, -7, "+")))).status is Status.APPLIED
        released.set()
        if optimistic:  # the stuck attempt, at last: the update was claimed meanwhile
            assert (await asyncio.wait_for(first, 10)).status is Status.DUPLICATE
        else:
            with pytest.raises(TryLater):  # its transaction is gone
                await asyncio.wait_for(first, 10)
        assert await count(storage) == 1
    finally:
        released.set()
        await storage.close()


@pytest.mark.parametrize("optimistic", [False, True], ids=["locked", "optimistic"])
async def test_handlers_that_never_end_do_not_keep_the_pool_from_other_chats(
    database_url: str, optimistic: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """As many handlers that swallow their cancellation and never end as the pool has connections, each
    in a chat of its own. Each held its pooled connection (with locks: in its open transaction; without:
    the one its session was read on alone) for as long as it ran, and every other chat's update waited
    DB_ACQUIRE_TIMEOUT for one and got 503, for good. An attempt still running RECORD_WITHIN past its
    deadline has its connections closed now (its transaction rolled back, its row unlocked) and their
    places in the pool given back. Nothing of the stuck attempts is applied, when they end at last too:
    each update is applied once, by its redelivery."""
    released = asyncio.Event()
    storage = await PostgresStorage.connect(database_url, max_size=3, acquire_timeout=0.2)
    run = Pipeline(stubborn_bot(released), storage, ME, Metrics(), optimistic=optimistic, deadline=0.3)
    run.deadlines.overdue_after = 0.3  # (RECORD_WITHIN, for a 0.3 s deadline)
    stuck = []
    for n in (1, 2, 3):
        stuck.append(asyncio.ensure_future(run.process(update(message_update(n, -n, "stubborn")))))
        await asyncio.sleep(0.05)  # (each read alone, on a connection of its own, not in one batch)
    try:
        await asyncio.sleep(1.0)  # past each deadline and its grace
        for n in range(10, 15):  # another chat, again and again: never a 503
            plus = await asyncio.wait_for(run.process(update(message_update(n, -7, "+"))), 5)
            assert plus.status is Status.APPLIED
        assert await count(storage) == 5
        assert [await count(storage, str(-n)) for n in (1, 2, 3)] == [0, 0, 0]  # rolled back
        assert not any(task.done() for task in stuck)  # (still running: nothing ended them)
        released.set()
        for task in stuck:  # at last: its connection is gone, nothing of it is applied
            with pytest.raises(TryLater):
                await asyncio.wait_for(task, 5)
        assert [await count(storage, str(-n)) for n in (1, 2, 3)] == [0, 0, 0]
        for n in (1, 2, 3):  # Telegram's redelivery applies it, once
            redelivered = await run.process(update(message_update(n, -n, "stubborn")))
            assert redelivered.status is Status.APPLIED
        assert [await count(storage, str(-n)) for n in (1, 2, 3)] == [100, 100, 100]
        assert run.metrics.count("bot_stuck_updates_total") == 3
        warnings = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
        assert len(warnings) == 3  # one per stuck attempt, naming the update and the handler's line
        for n, line in zip((1, 2, 3), warnings, strict=True):
            assert re.match(
                rf"update {n} \(chat {-n}\) is still running 0\.\d s past its 0\.3 s deadline", line
            )
            assert re.search(r"at stubborn_bot\.<locals>\.stubborn \(.*test_dead_letters\.py:\d+\)", line)
            assert "closed the 1 database connection(s) it held: its transaction is rolled back" in line
    finally:
        released.set()
        await asyncio.wait(stuck, timeout=10)
        await storage.close()


async def test_a_handler_that_never_ends_on_a_storage_without_connections_is_named_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A storage with nothing to take back (the memory storage): the stuck attempt is still counted and
    named once, however long it runs."""
    released = asyncio.Event()
    run = Pipeline(stubborn_bot(released), MemoryStorage(), ME, Metrics(), deadline=0.1)
    run.deadlines.overdue_after = 0.1  # (RECORD_WITHIN, for a 0.1 s deadline)
    stuck = asyncio.ensure_future(run.process(update(message_update(1, -7, "stubborn"))))
    try:
        await asyncio.sleep(0.6)  # looked at again four times
        [line] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert line.startswith("update 1 (chat -7) is still running")
        assert "at stubborn_bot.<locals>.stubborn (" in line
        assert "it holds no database connection now" in line
        assert run.metrics.count("bot_stuck_updates_total") == 1
    finally:
        released.set()
        await asyncio.wait([stuck], timeout=10)


async def test_a_chat_whose_handler_never_ends_runs_its_next_updates_with_its_row_unlocked(
    database_url: str,
) -> None:
    """With locks, a handler that swallows its cancellation and never ends held its chat's row lock for
    as long as it ran (unless the server ended its transaction: idle_in_transaction_session_timeout, 3 x
    DB_STATEMENT_TIMEOUT, 30 s by default, or never when set higher): the chat's next updates, let past
    its stuck turn, waited on the row for DB_LOCK_TIMEOUT and got 503. Its connection is closed now once
    it is RECORD_WITHIN past its deadline, which unlocks the row before its turn is treated as stuck. The
    stuck update is counted neither then nor after: redelivered, it is a dead letter at the bound (its
    attempt still runs here), and its attempt, ending at last, applies nothing."""
    released = asyncio.Event()
    storage = await PostgresStorage.connect(database_url, lock_timeout=0.3, statement_timeout=60)
    run = Pipeline(
        stubborn_bot(released), storage, ME, Metrics(), deadline=0.3, give_up=TransientFailures(2, 0)
    )
    run.deadlines.overdue_after = 0.3  # (RECORD_WITHIN, for a 0.3 s deadline)
    run.lock_turns.turns.stuck_after = 0.7  # (TURN_STUCK_AFTER: past the deadline and its grace)
    stuck = update(message_update(1, -7, "stubborn"))
    first = asyncio.ensure_future(run.process(stuck))
    try:
        await asyncio.sleep(0.8)
        for n in (2, 3):
            plus = await asyncio.wait_for(run.process(update(message_update(n, -7, "+"))), 5)
            assert plus.status is Status.APPLIED
        with pytest.raises(TryLater, match="still running"):
            await asyncio.wait_for(run.process(stuck), 5)
        assert (await asyncio.wait_for(run.process(stuck), 5)).status is Status.DEAD_LETTER
        released.set()
        with pytest.raises(TryLater):
            await asyncio.wait_for(first, 5)
        assert await count(storage) == 2
        assert [letter.update_id for letter in await storage.dead_letters(ME.id)] == [1]
        assert (await run.process(stuck)).status is Status.DUPLICATE
        assert await count(storage) == 2
    finally:
        released.set()
        await asyncio.wait([first], timeout=10)
        await storage.close()


async def test_an_update_waiting_for_a_turn_that_becomes_stuck_runs_with_locks_within_its_delivery(
    database_url: str,
) -> None:
    """Optimistic mode: an update of the chat that queued for the session's turn before the stubborn
    attempt had held it TURN_STUCK_AFTER waited for it until its own deadline, a 503; one arriving a
    moment later ran with locks at once. Both run with locks now, the first once the turn is stuck."""
    released = asyncio.Event()
    bot = stubborn_bot(released)
    storage = await PostgresStorage.connect(database_url)
    run = Pipeline(bot, storage, ME, Metrics(), optimistic=True, deadline=0.6)
    storage.turns.stuck_after = 1.0  # (TURN_STUCK_AFTER, past the deadline)
    first = asyncio.ensure_future(run.process(update(message_update(1, -7, "stubborn"))))
    try:
        await asyncio.sleep(0.7)  # past the stubborn attempt's deadline, not yet stuck
        plus_one = await asyncio.wait_for(run.process(update(message_update(2, -7, "+"))), 5)
        assert plus_one.status is Status.APPLIED  # at 1.0 s, within its deadline (1.3 s)
        assert await count(storage) == 1
    finally:
        released.set()
        await asyncio.wait_for(first, 10)
        await storage.close()


async def test_a_transient_failure_that_passes_before_the_bound_applies_the_update(storage: Storage) -> None:
    failing = {"left": 2}
    bot: Bot[Counted] = Bot(session(Counted))

    @bot.message(text(equals="+"))
    async def plus(ctx: Context[Counted]) -> None:
        if failing["left"]:
            failing["left"] -= 1
            raise StorageUnavailable("lock timeout")
        ctx.session.count += 1

    run = Pipeline(bot, storage, ME, Metrics(), give_up=TransientFailures(3, 0))
    plus_update = update(message_update(1, -7, "+"))
    for _ in range(2):
        with pytest.raises(TryLater, match="lock timeout"):
            await run.process(plus_update)
    assert (await run.process(plus_update)).status is Status.APPLIED
    assert (await count(storage), await storage.dead_letters(ME.id)) == (1, [])


async def test_replay_applies_a_dead_letter_once_and_removes_it(storage: Storage) -> None:
    broken = Pipeline(button_bot(), storage, ME, Metrics())
    assert (await broken.process(press(1, FILTER_DATA))).status is Status.DEAD_LETTER
    [letter] = await storage.dead_letters(ME.id)
    fixed = Pipeline(build_fixed(), storage, ME, Metrics())
    replayed = await fixed.replay(letter)
    assert replayed.status is Status.APPLIED
    assert [c.method for c in replayed.to_send] == ["answerCallbackQuery"]
    assert (await count(storage), await storage.dead_letters(ME.id)) == (1, [])
    assert (await fixed.replay(letter)).status is Status.DUPLICATE  # once
    assert (await fixed.process(press(1, FILTER_DATA))).status is Status.DUPLICATE  # and redelivered
    assert await count(storage) == 1


async def test_a_replay_no_handler_wants_any_more_is_ignored_and_unlisted(storage: Storage) -> None:
    broken = Pipeline(button_bot(), storage, ME, Metrics())
    assert (await broken.process(press(1, FILTER_DATA))).status is Status.DEAD_LETTER
    [letter] = await storage.dead_letters(ME.id)
    without_buttons: Bot[Counted] = Bot(session(Counted))

    @without_buttons.message()
    async def any_message(ctx: Context[Counted]) -> None:
        ctx.session.count += 1

    replayed = await Pipeline(without_buttons, storage, ME, Metrics()).replay(letter)
    assert (replayed.status, replayed.to_send) == (Status.IGNORED, [])
    assert (await count(storage), await storage.dead_letters(ME.id)) == (0, [])


async def test_a_replay_that_fails_again_stays_listed_with_one_more_attempt(storage: Storage) -> None:
    run = Pipeline(button_bot(), storage, ME, Metrics())
    assert (await run.process(press(1, FILTER_DATA))).status is Status.DEAD_LETTER
    [letter] = await storage.dead_letters(ME.id)
    assert (await run.replay(letter)).status is Status.DEAD_LETTER
    [again] = await storage.dead_letters(ME.id)
    assert (again.attempts, again.error, again.body) == (2, letter.error, letter.body)
    assert await count(storage) == 0


async def test_two_replays_at_once_apply_it_once(storage: Storage) -> None:
    assert (await Pipeline(button_bot(), storage, ME, Metrics()).process(press(1, FILTER_DATA))).status is (
        Status.DEAD_LETTER
    )
    [letter] = await storage.dead_letters(ME.id)
    gate = asyncio.Event()
    run = Pipeline(_fixed_buttons(gate), storage, ME, Metrics())
    other = Pipeline(_fixed_buttons(gate), storage, ME, Metrics())
    first = asyncio.ensure_future(run.replay(letter))
    second = asyncio.ensure_future(other.replay(letter))
    await asyncio.sleep(0.3)
    assert not first.done() and not second.done()  # one in its handler, the other waiting on the letter
    gate.set()
    outcomes = sorted(o.status.value for o in await asyncio.wait_for(asyncio.gather(first, second), 10))
    assert outcomes == ["applied", "duplicate"]
    assert (await count(storage), await storage.dead_letters(ME.id)) == (1, [])


async def test_a_redelivery_racing_a_replay_is_a_duplicate_and_the_replay_applies_it(
    storage: Storage,
) -> None:
    assert (await Pipeline(button_bot(), storage, ME, Metrics()).process(press(1, FILTER_DATA))).status is (
        Status.DEAD_LETTER
    )
    [letter] = await storage.dead_letters(ME.id)
    gate = asyncio.Event()
    replaying = asyncio.ensure_future(Pipeline(_fixed_buttons(gate), storage, ME, Metrics()).replay(letter))
    await asyncio.sleep(0.2)  # the replay holds the letter, waiting in its handler
    webhook = Pipeline(_fixed_buttons(gate), storage, ME, Metrics())
    redelivered = await asyncio.wait_for(webhook.process(press(1, FILTER_DATA)), 5)
    assert redelivered.status is Status.DUPLICATE
    gate.set()
    assert (await asyncio.wait_for(replaying, 10)).status is Status.APPLIED
    assert await count(storage) == 1


def _fixed_buttons(gate: asyncio.Event) -> Bot[Counted]:
    bot: Bot[Counted] = Bot(session(Counted))

    @bot.callback_query()
    async def any_press(ctx: Context[Counted]) -> None:
        await gate.wait()
        ctx.session.count += 1

    return bot


class AppsOwnBaseException(BaseException):
    """An exception class of an app's own (or of a library it uses) derived from BaseException."""


# What a bot's code may raise that is no Exception. A CancelledError here is one nobody asked for: awaiting
# a future or task that something else cancelled raises it in the handler, while the update is not cancelled.
NOT_EXCEPTIONS = [SystemExit, KeyboardInterrupt, GeneratorExit, asyncio.CancelledError, AppsOwnBaseException]


def bot_raising(raised: Callable[[], BaseException], where: str) -> Bot[Counted]:
    """`+` counts; `bad` counts too, but what `raised` makes comes from its filter, its handler or the
    error hook (run in the handler's transaction, or after the rollback for a filter's bug)."""
    bot = plus_bot()

    def wanted(ctx: Context[Counted]) -> bool:
        if where == "filter":
            raise raised()
        if where == "error hook, for a filter":
            raise ValueError("the filter's bug, for the error hook")
        return True

    @bot.message(text(equals="bad"), wanted)
    async def bad(ctx: Context[Counted]) -> None:
        ctx.session.count += 1
        if where == "handler":
            raise raised()
        raise ValueError("the handler's bug, for the error hook")

    if where.startswith("error hook"):

        @bot.catch
        async def on_error(error: Exception, ctx: Context[Counted]) -> None:
            raise raised()

    return bot


async def bad_is_a_dead_letter_and_the_chat_moves_on(run: Pipeline, storage: Storage) -> DeadLetter:
    """Chat -7's "bad" (a `bot_raising` bot's): a dead letter, a duplicate when delivered again, and the
    chat's next "+" applied; the one dead letter recorded, returned."""
    bad = update(message_update(1, -7, "bad"))
    assert (await run.process(bad)).status is Status.DEAD_LETTER
    assert (await run.process(bad)).status is Status.DUPLICATE
    assert (await run.process(update(message_update(2, -7, "+")))).status is Status.APPLIED
    assert await count(storage) == 1
    [letter] = await storage.dead_letters(ME.id)
    return letter


@pytest.mark.parametrize("where", ["filter", "handler", "error hook", "error hook, for a filter"])
@pytest.mark.parametrize("raised", NOT_EXCEPTIONS, ids=lambda c: c.__name__)
async def test_a_base_exception_from_the_bot_s_code_is_a_dead_letter_and_the_chat_moves_on(
    storage: Storage, raised: type[BaseException], where: str
) -> None:
    """sys.exit() in a handler, a stray CancelledError...: none is an Exception, so each escaped the
    pipeline. uvicorn answered 500 on every delivery (Telegram holds the chat behind it for up to 24 h),
    and `poll` stopped (quietly, for a KeyboardInterrupt). A bug like any other now."""
    run = Pipeline(bot_raising(raised, where), storage, ME, Metrics())
    letter = await bad_is_a_dead_letter_and_the_chat_moves_on(run, storage)
    assert letter.error.startswith(f"StrayBaseException: the bot's code raised {raised.__name__}")
    assert run.metrics.count("bot_updates_total", kind="message", outcome="dead_letter") == 1


@pytest.mark.parametrize("where", ["filter", "handler", "error hook"])
async def test_a_conflict_raised_by_the_bot_s_code_where_no_attempt_is_optimistic_is_a_dead_letter(
    storage_mode: tuple[Storage, bool], where: str
) -> None:
    """The optimistic attempts' signal is ControlFlow, which went on up from everywhere: raised by the
    bot's code in an attempt with locks, a filter or the error hook (where the framework raises none), it
    escaped the pipeline, a 500 on every delivery. A bug like any other there; in an optimistic attempt it
    still hands the update over to the attempt with locks, which then records it."""
    storage, optimistic = storage_mode
    kept = Conflict("kept from an earlier attempt")  # (caught in an optimistic attempt, raised again)
    run = Pipeline(bot_raising(lambda: kept, where), storage, ME, Metrics(), optimistic=optimistic)
    letter = await bad_is_a_dead_letter_and_the_chat_moves_on(run, storage)
    assert letter.error == "StrayBaseException: the bot's code raised Conflict: kept from an earlier attempt"


@pytest.mark.parametrize("hooked", [False, True], ids=["no hook", "error hook"])
async def test_an_exception_whose_str_fails_is_a_dead_letter_naming_its_type(
    storage: Storage, hooked: bool
) -> None:
    """Without an error hook it escaped the pipeline (describing it for the dead letter raised), a 500 on
    every delivery; with one, the hook's handling was undone and the KeyError recorded instead."""
    bot = plus_bot()

    @bot.message(text(equals="bad"))
    async def bad(ctx: Context[Counted]) -> None:
        ctx.session.count += 1
        raise NoMessage

    if hooked:

        @bot.catch
        async def on_error(error: Exception, ctx: Context[Counted]) -> None:
            ctx.reply("sorry")

    run = Pipeline(bot, storage, ME, Metrics())
    failed = await run.process(update(message_update(1, -7, "bad")))
    assert (await run.process(update(message_update(2, -7, "+")))).status is Status.APPLIED
    assert await count(storage) == 1
    if hooked:
        assert (failed.status, [c.params["text"] for c in failed.to_send]) == (Status.FAILED, ["sorry"])
        assert await storage.dead_letters(ME.id) == []
    else:
        assert failed.status is Status.DEAD_LETTER
        [letter] = await storage.dead_letters(ME.id)
        assert letter.error == "NoMessage: <str() failed>"


async def test_the_update_s_own_cancellation_still_goes_on_up(storage: Storage) -> None:
    """A shutdown cancelling the request is no bug of the bot's: nothing is recorded, the update is not
    applied, and the cancellation reaches whoever cancelled."""
    gate = asyncio.Event()
    bot: Bot[Counted] = Bot(session(Counted))

    @bot.message(text(equals="slow"))
    async def slow(ctx: Context[Counted]) -> None:
        ctx.session.count += 1
        await gate.wait()

    run = Pipeline(bot, storage, ME, Metrics())
    attempt = asyncio.ensure_future(run.process(update(message_update(1, -7, "slow"))))
    await asyncio.sleep(0.2)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    assert (await count(storage), await storage.dead_letters(ME.id)) == (0, [])


# --- values PostgreSQL refuses (finding 3) -----------------------------------------------------------


@pytest.mark.parametrize("optimistic", [False, True], ids=["locked", "optimistic"])
@pytest.mark.parametrize("said", ["nul in the session \x00", "nul in a reply \x00"])
async def test_nul_in_a_session_string_or_a_reply_is_a_dead_letter_and_the_session_memory_stays(
    database_url: str, said: str, optimistic: bool
) -> None:
    """Finding 3: PostgreSQL's jsonb refuses \\u0000; that was StorageUnavailable, so every delivery got
    a 503 and emptied the session memory. Now: a dead letter, 200, and other chats stay remembered."""
    storage = await PostgresStorage.connect(database_url)
    try:
        run = Pipeline(build_broken(), storage, ME, Metrics(), optimistic=optimistic)
        assert (await run.process(update(message_update(1, -8, "+")))).status is Status.APPLIED
        remembered = storage.cache.get("-8")
        assert (remembered is not None) == optimistic
        assert (await run.process(update(message_update(2, -7, said)))).status is Status.DEAD_LETTER
        [letter] = await storage.dead_letters(ME.id)
        assert letter.error.startswith("StorageRefused: ") and "UntranslatableCharacterError" in letter.error
        assert "\\u0000" in letter.body  # as received (the escape, which text keeps as it is)
        assert storage.cache.get("-8") == remembered
        assert (await run.process(update(message_update(3, -7, "+")))).status is Status.APPLIED
        assert (await count(storage, "-7"), await count(storage, "-8")) == (1, 1)
    finally:
        await storage.close()


# --- the webhook --------------------------------------------------------------------------------------


async def post(client: httpx.AsyncClient, raw: dict[str, Any]) -> int:
    headers = {SECRET_HEADER: SECRET, "content-type": "application/json"}
    return (await client.post("/webhook", content=encode(raw), headers=headers)).status_code


async def dead_letter_rows(database_url: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT update_id, chat, kind, error, attempts FROM dead_letters ORDER BY update_id"
        )
    finally:
        await conn.close()
    return [dict(row) for row in rows]


async def test_a_button_whose_filter_raises_is_answered_200_on_every_delivery_and_recorded_once(
    open_client: OpenClient, database_url: str, telegram_root: str
) -> None:
    """Finding 2 through HTTP: it was a 500 on every delivery (Telegram would hold the chat for 24 h)."""
    hooked: list[str] = []
    settings = make_settings(database_url, telegram_root)
    async with open_client(settings, button_bot(hooked)) as client:
        raw = callback_update(1, -7, 5, FILTER_DATA)
        assert [await post(client, raw) for _ in range(2)] == [200, 200]
        assert await post(client, callback_update(2, -7, 5, "9")) == 200
    assert hooked == ["ValueError"]
    assert await dead_letter_rows(database_url) == [
        {
            "update_id": 1,
            "chat": "-7",
            "kind": "callback_query",
            "error": "ValueError: invalid literal for int() with base 10: 'oops'",
            "attempts": 1,
        }
    ]


@pytest.mark.parametrize(
    ("mode", "limits", "failure"),
    [
        # Each attempt ends at DB_LOCK_TIMEOUT in both modes (test_app.py); here the request's deadline
        # ends the optimistic ones first (1 s, before the default lock timeout's 5 s): both transient.
        ("locked", {"DB_LOCK_TIMEOUT": "0.2"}, r"StorageUnavailable: .*LockNotAvailable.*"),
        ("optimistic", {"REQUEST_DEADLINE": "1"}, r"no result within 1 s"),
    ],
)
async def test_a_row_locked_past_every_delivery_is_a_dead_letter_at_the_bound_and_its_chat_moves_on(
    open_client: OpenClient,
    database_url: str,
    telegram_root: str,
    fake: FakeTelegram,
    mode: str,
    limits: dict[str, str],
    failure: str,
) -> None:
    settings = make_settings(
        database_url,
        telegram_root,
        DB_CONCURRENCY=mode,
        DEAD_LETTER_AFTER="3",
        DEAD_LETTER_AFTER_SECONDS="0",
        **limits,
    )
    async with open_client(settings, build_broken()) as client:
        assert await post(client, message_update(1, -7, "+")) == 200
        blocker = await asyncpg.connect(database_url)
        try:
            async with blocker.transaction():
                await blocker.execute("SELECT FROM sessions WHERE key = '-7' FOR UPDATE")
                statuses = [await post(client, message_update(2, -7, "+")) for _ in range(3)]
        finally:
            await blocker.close()
        assert statuses == [503, 503, 200]
        assert await post(client, message_update(3, -7, "+")) == 200
        assert await post(client, message_update(4, -7, "count")) == 200
        await fake.wait_for_async(lambda: len(fake.sent_messages(-7)) == 1)
    assert fake.sent_messages(-7)[0]["text"] == "count 2"  # update 2 waits in the dead letters
    [row] = await dead_letter_rows(database_url)
    assert (row["update_id"], row["attempts"]) == (2, 3)
    assert re.fullmatch(rf"gave up after 3 transient failures in \d+ s: {failure}", row["error"])


# --- the commands ---------------------------------------------------------------------------------------


def cli(*args: str, database_url: str, telegram_root: str) -> subprocess.CompletedProcess[str]:
    """`python -m bot ARGS` with the tests' bot (faulty_bot importable) on the test's database."""
    env = bot_env(database_url, telegram_root, PYTHONPATH=os.pathsep.join([TESTS, os.getcwd()]))
    return run_cli(*args, env=env)


def test_the_dead_letter_table_shows_each_in_one_line_cut_to_fit() -> None:
    letters = [
        DeadLetter(7, "{}", "ValueError: " + "x" * 300, "", "-1001", "callback_query", 2, 1796190000.0),
        DeadLetter(12, "{}", "TypeError: no", "", None, None, 1, 1796190060.0),
    ]
    assert table(letters, width=80).splitlines() == [
        "UPDATE  CHAT   KIND            ATTEMPTS  FAILED (UTC)         ERROR",
        "7       -1001  callback_query  2         2026-12-02 05:40:00  ValueError: xxxxx…",
        "12      -      -               1         2026-12-02 05:41:00  TypeError: no",
    ]
    assert table([]) == "no dead letters"


async def test_every_kind_of_bug_is_a_dead_letter_the_chat_moves_on_and_replay_applies_each_once(
    open_client: OpenClient, database_url: str, telegram_root: str, fake: FakeTelegram
) -> None:
    """The issue's test: a bot whose filter, middleware, handler, session values (a string jsonb refuses,
    a value of the wrong type) and session encoding each fail on some updates, and a reply the database
    refuses, driven through the webhook. Each is answered 200 (on its first delivery, and on a redelivery without running again),
    is listed by `python -m bot dead-letters`, and the chat's later updates are counted exactly; once the
    code is fixed, `python -m bot replay --all` applies each once."""
    chat = -7
    failing = [callback_update(100, chat, 5, FILTER_DATA)] + [
        message_update(101 + n, chat, said) for n, said in enumerate(FAILING_TEXTS)
    ]
    settings = make_settings(database_url, telegram_root)
    async with open_client(settings, build_broken()) as client:
        update_id = 1
        for bad in failing:
            assert await post(client, message_update(update_id, chat, "+")) == 200
            assert await post(client, bad) == 200
            assert await post(client, bad) == 200  # Telegram's redelivery, in case the 200 was lost
            update_id += 1
        assert await post(client, message_update(update_id, chat, "count")) == 200
        await fake.wait_for_async(lambda: len(fake.sent_messages(chat)) == 1)
        assert fake.sent_messages(chat)[0]["text"] == f"count {len(failing)}"

    listed = cli("dead-letters", database_url=database_url, telegram_root=telegram_root)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["UPDATE", "CHAT", "KIND", "ATTEMPTS", "FAILED", "(UTC)", "ERROR"]
    rows = {int(line.split()[0]): line for line in lines[1:]}
    assert sorted(rows) == [u.update_id for u in failing]
    assert "callback_query" in rows[100] and "ValueError: invalid literal for int()" in rows[100]
    for update_id, error in zip(range(101, 101 + len(FAILING_TEXTS)), FAILING_TEXTS.values(), strict=True):
        assert f"{update_id}  " in rows[update_id] and f" {chat} " in rows[update_id]
        assert " message " in rows[update_id] and error in rows[update_id], rows[update_id]
    shown = cli("dead-letters", "102", database_url=database_url, telegram_root=telegram_root)
    assert "error: ZeroDivisionError" in shown.stdout and '"text":"handler"' in shown.stdout.replace(" ", "")
    assert "Traceback (most recent call last)" in shown.stdout

    fixed = ("--app", "faulty_bot:build_fixed")
    replayed = cli("replay", "--all", *fixed, database_url=database_url, telegram_root=telegram_root)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert replayed.stdout.splitlines() == [f"update {u.update_id}: applied" for u in failing]
    again = cli("replay", "--all", *fixed, database_url=database_url, telegram_root=telegram_root)
    assert (again.returncode, again.stdout.strip()) == (0, "no dead letters")
    missing = cli("replay", "102", *fixed, database_url=database_url, telegram_root=telegram_root)
    assert missing.returncode == 1
    assert (
        missing.stderr.strip()
        == "bot: update 102 is not a dead letter (`python -m bot dead-letters` lists them)"
    )

    storage = await PostgresStorage.connect(database_url)
    try:
        assert await count(storage, str(chat)) == 2 * len(failing)  # every update, each exactly once
        assert await storage.dead_letters(ME.id) == []
    finally:
        await storage.close()
    [reply] = [m["text"] for m in fake.sent_messages(chat) if m["text"].startswith("nul")]
    assert reply == "nul in a reply "  # the fixed code's reply, sent once


def test_a_replay_that_fails_again_exits_1_saying_so(
    database_url: str, telegram_root: str, fake: FakeTelegram
) -> None:
    async def dead_letter() -> None:
        storage = await PostgresStorage.connect(database_url)
        try:
            run = Pipeline(build_broken(), storage, ME, Metrics())
            assert (await run.process(update(message_update(1, -7, "handler")))).status is Status.DEAD_LETTER
        finally:
            await storage.close()

    asyncio.run(dead_letter())
    broken = ("--app", "faulty_bot:build_broken")
    replayed = cli("replay", "1", *broken, database_url=database_url, telegram_root=telegram_root)
    assert replayed.returncode == 1
    assert replayed.stdout.strip() == (
        "update 1: failed again: still a dead letter (attempt 2): ZeroDivisionError: division by zero"
    )
    listed = cli("dead-letters", database_url=database_url, telegram_root=telegram_root)
    assert listed.stdout.splitlines()[1].split()[:4] == ["1", "-7", "message", "2"]


def test_poll_records_a_poison_update_and_moves_on(
    database_url: str, telegram_root: str, fake: FakeTelegram, tmp_path: Path
) -> None:
    """Finding 2 in `poll`: the loop died on the filter's exception and, restarted, died again at the
    same offset. Now the update is a dead letter and the next ones are applied."""
    fake.push_update(callback_update(1, -7, 5, FILTER_DATA))
    fake.push_update(message_update(2, -7, "+"))
    fake.push_update(message_update(3, -7, "count"))
    log = (tmp_path / "poll.log").open("w")
    env = {
        **os.environ,
        **bot_env(database_url, telegram_root, PYTHONPATH=os.pathsep.join([TESTS, os.getcwd()])),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "poll", "--app", "faulty_bot:build_broken"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        fake.wait_for(lambda: len(fake.sent_messages(-7)) >= 1, timeout=30)
        assert fake.sent_messages(-7)[0]["text"] == "count 1"
        assert process.poll() is None  # still polling
    finally:
        log.close()  # first: the process has its own copy, and a failed interrupt must not leak ours
        interrupt(process)
    assert "update 1 is a dead letter (attempt 1): ValueError" in (tmp_path / "poll.log").read_text()


# --- the error hook's own failures -----------------------------------------------------------------


def hooked_bot(hook_does: str) -> Bot[Counted]:
    """A bot whose button filter and "boom" handler fail, with an error hook that fails in its turn."""
    bot = button_bot()

    @bot.message(text(equals="boom"))
    async def boom(ctx: Context[Counted]) -> None:
        ctx.session.count += 1
        raise ZeroDivisionError("the handler's bug")

    @bot.catch
    async def on_error(error: Exception, ctx: Context[Counted]) -> None:
        if hook_does == "raise":
            raise KeyError("the hook's own bug")
        ctx.reply("sorry \x00")  # a reply PostgreSQL refuses to store

    return bot


@pytest.mark.parametrize("hook_does", ["raise", "unstorable reply"])
@pytest.mark.parametrize("failing", ["handler", "filter"])
async def test_an_error_hook_that_fails_is_contained_and_the_update_recorded(
    database_url: str, hook_does: str, failing: str
) -> None:
    storage = await PostgresStorage.connect(database_url)
    try:
        run = Pipeline(hooked_bot(hook_does), storage, ME, Metrics())
        bad = press(1, FILTER_DATA) if failing == "filter" else update(message_update(1, -7, "boom"))
        outcome = await run.process(bad)
        assert (outcome.status, outcome.to_send) == (Status.DEAD_LETTER, [])
        [letter] = await storage.dead_letters(ME.id)
        if hook_does == "raise":
            # The hook's error, with the one it was handling in its traceback.
            assert letter.error == 'KeyError: "the hook\'s own bug"'
            original = "ZeroDivisionError" if failing == "handler" else "ValueError"
            assert original in letter.traceback
        else:
            assert letter.error.startswith("StorageRefused: ") and "sendMessage" not in letter.error
        assert await storage.pool.fetchval("SELECT count(*) FROM outbox") == 0  # the hook's reply: not kept
        assert await count(storage) == 0
    finally:
        await storage.close()
