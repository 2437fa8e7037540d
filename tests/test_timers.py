"""Durable timers through the pipeline (`Pipeline.fire`) and the loop that fires them (`bot.timers`): once,
never early, in the scheduling update's transaction, with that chat's sessions; on both storages where
time allows, and on the memory storage with a clock moved by hand where it does not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from bot.context import BotIdentity, Context
from bot.dialogs import Dialog, State, StatesGroup
from bot.dispatch import Bot
from bot.failures import TransientFailures, TryLater
from bot.filters import text
from bot.metrics import Metrics
from bot.outbox import Outbox
from bot.pipeline import Outcome, Pipeline, Status
from bot.runtime import start
from bot.session import chat_user_key, session
from bot.storage import Conflict, Storage, StoredSession, TimerChange
from bot.storage.memory import MemoryStorage, _MemoryTransaction
from bot.storage.postgres import PostgresStorage
from bot.testing.env import make_settings
from bot.testing.updates import text_update
from bot.timers import PICKED_PER_SLOT, TimerLoop

pytestmark = pytest.mark.anyio

ME = BotIdentity(1, "timer_bot")
CHAT, ANN = -100, 11


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now


@dataclass
class Log:
    fired: list[str] = field(default_factory=list)


def timer_bot() -> Bot[Log]:
    """`in <seconds> <tag>` schedules a ping; each ping appends its tag to the chat's log and replies."""
    bot: Bot[Log] = Bot(session(initial=Log))

    @bot.message(text(startswith="in "))
    async def schedule(ctx: Context[Log]) -> None:
        assert ctx.message is not None and ctx.message.text is not None
        _, seconds, tag = ctx.message.text.split(maxsplit=2)
        name = tag.removeprefix("name=") if tag.startswith("name=") else None
        ctx.schedule("ping", after=float(seconds), payload={"tag": tag}, name=name)

    @bot.message(text(equals="boom"))
    async def schedules_then_fails(ctx: Context[Log]) -> None:
        ctx.schedule("ping", after=0, payload={"tag": "never"})
        raise RuntimeError("boom")

    @bot.message(text(equals="typo"))
    async def unknown_handler(ctx: Context[Log]) -> None:
        ctx.schedule("pnig", after=0)

    @bot.message(text(equals="look"))
    async def look(ctx: Context[Log]) -> None:
        ctx.reply(" ".join(ctx.session.fired) or "nothing")

    @bot.message(text(startswith="cancel "))
    async def cancel(ctx: Context[Log]) -> None:
        assert ctx.message is not None and ctx.message.text is not None
        ctx.cancel(ctx.message.text.removeprefix("cancel "))

    @bot.timer("ping")
    async def ping(ctx: Context[Log]) -> None:
        assert ctx.timer is not None
        tag = ctx.timer.payload["tag"]
        if tag == "fail":
            raise ZeroDivisionError("a bug in a timer handler")
        ctx.session.fired.append(tag)
        ctx.reply(f"ping {tag}, {ctx.timer.late:.0f} s late")

    return bot


class Chat:
    def __init__(self, run: Pipeline) -> None:
        self.run = run
        self.update_id = 0

    async def say(self, said: str, chat: int = CHAT, **kwargs: Any) -> Outcome:
        self.update_id += 1
        return await self.run.process(text_update(self.update_id, chat, said, from_id=ANN, **kwargs))


def texts(outcome: Outcome) -> list[str]:
    return [call.params["text"] for call in outcome.to_send]


async def fire_due(run: Pipeline) -> list[Outcome]:
    due = await run.storage.claim_due_timers(ME.id, 100, 30.0)
    return [await run.fire(timer) for timer in due]


async def log_of(storage: Storage, chat: int = CHAT) -> str | None:
    async with storage.transaction() as tx:
        stored = await tx.read(str(chat))
    return stored.data.replace(" ", "") if isinstance(stored, StoredSession) else None


async def test_a_timer_fires_once_when_due_and_not_a_moment_before() -> None:
    clock = Clock()
    storage = MemoryStorage(clock=clock)
    run = Pipeline(timer_bot(), storage, ME, Metrics())
    chat = Chat(run)
    assert (await chat.say("in 60 a")).status is Status.APPLIED
    clock.now += 59.9
    assert await fire_due(run) == []
    clock.now += 0.1
    [due] = await storage.claim_due_timers(ME.id, 10, 30.0)
    fired = await run.fire(due)
    assert (fired.status, texts(fired)) == (Status.APPLIED, ["ping a, 0 s late"])
    again = await run.fire(due)  # another process picked it too, after its lease ran out
    assert (again.status, texts(again)) == (Status.DUPLICATE, [])
    assert await log_of(storage) == '{"fired":["a"]}'


async def test_a_fire_that_was_due_while_the_bot_was_down_runs_late_and_says_so() -> None:
    clock = Clock()
    storage = MemoryStorage(clock=clock)
    await Chat(Pipeline(timer_bot(), storage, ME, Metrics())).say("in 10 a")
    clock.now += 3600  # nothing ran for an hour; a new process starts
    [fired] = await fire_due(Pipeline(timer_bot(), storage, ME, Metrics()))
    assert texts(fired) == ["ping a, 3590 s late"]


async def test_a_fire_replies_to_the_chat_and_topic_with_the_sessions_it_was_scheduled_from() -> None:
    bot: Bot[Log] = Bot(
        session(initial=Log),
        sessions={"mine": session(initial=Log, get_session_key=chat_user_key, prefix="u:")},
    )

    @bot.message(text())
    async def later(ctx: Context[Log]) -> None:
        ctx.fragment("mine").fired.append("scheduled")
        ctx.schedule("note", after=0)

    @bot.timer("note")
    async def note(ctx: Context[Log]) -> None:
        ctx.fragment("mine").fired.append("fired")
        ctx.reply(f"{ctx.from_user and ctx.from_user.id} {ctx.fragment('mine').fired}")

    storage = MemoryStorage()
    run = Pipeline(bot, storage, ME, Metrics())
    await Chat(run).say("x", thread_id=7)
    [fired] = await fire_due(run)
    [call] = fired.to_send
    assert call.params == {"chat_id": CHAT, "text": "11 ['scheduled', 'fired']", "message_thread_id": 7}


async def test_a_rolled_back_update_schedules_nothing(storage: Storage) -> None:
    run = Pipeline(timer_bot(), storage, ME, Metrics())
    assert (await Chat(run).say("boom")).status is Status.DEAD_LETTER
    assert await fire_due(run) == []


async def test_scheduling_a_handler_that_does_not_exist_fails_the_update_that_did_it(
    storage: Storage,
) -> None:
    run = Pipeline(timer_bot(), storage, ME, Metrics())
    assert (await Chat(run).say("typo")).status is Status.DEAD_LETTER
    assert await fire_due(run) == []


async def test_a_timer_handler_that_raises_is_rolled_back_and_kept_as_failed(storage: Storage) -> None:
    run = Pipeline(timer_bot(), storage, ME, Metrics())
    await Chat(run).say("in 0 fail")
    [fired] = await fire_due(run)
    assert (fired.status, fired.to_send) == (Status.DEAD_LETTER, [])
    assert run.metrics.count("bot_timers_total", outcome="dead_letter") == 1
    await asyncio.sleep(0.05)
    assert await fire_due(run) == [], "a bug is not retried forever"
    if isinstance(storage, PostgresStorage):
        row = await storage.pool.fetchrow("SELECT last_error FROM timers WHERE failed_at IS NOT NULL")
        assert row is not None and row["last_error"] == "ZeroDivisionError: a bug in a timer handler"


@pytest.mark.parametrize(
    "raised", [SystemExit, KeyboardInterrupt, asyncio.CancelledError, Conflict], ids=lambda c: c.__name__
)
async def test_a_timer_handler_raising_what_is_no_exception_is_kept_as_failed_and_the_process_goes_on(
    storage: Storage, raised: type[BaseException]
) -> None:
    """A SystemExit or KeyboardInterrupt left the fire's task and stopped the event loop: `serve` exited
    (status 3 for sys.exit(3)), and after each restart the timer, due again, stopped it again. A stray
    CancelledError left the timer leased, to be fired again after every lease; so did the framework's
    own Conflict, raised by the handler where no attempt is optimistic."""
    bot = timer_bot()

    @bot.message(text(equals="halt"))
    async def schedule_halt(ctx: Context[Log]) -> None:
        ctx.schedule("halt", after=0)

    @bot.timer("halt")
    async def halt(ctx: Context[Log]) -> None:
        raise raised()

    run = Pipeline(bot, storage, ME, Metrics())
    await Chat(run).say("halt")
    [fired] = await fire_due(run)
    assert (fired.status, fired.to_send) == (Status.DEAD_LETTER, [])
    await asyncio.sleep(0.05)
    assert await fire_due(run) == [], "kept as failed, never fired again"


async def test_the_error_hook_gets_a_failing_timer_and_its_answer_commits_once(storage: Storage) -> None:
    bot = timer_bot()

    @bot.catch
    async def sorry(error: Exception, ctx: Context[Log]) -> None:
        assert ctx.timer is not None
        ctx.reply(f"sorry: {error}")

    run = Pipeline(bot, storage, ME, Metrics())
    await Chat(run).say("in 0 fail")
    [fired] = await fire_due(run)
    assert (fired.status, texts(fired)) == (Status.FAILED, ["sorry: a bug in a timer handler"])
    assert await fire_due(run) == [], "handled: the timer is gone"


async def test_a_name_replaces_and_cancels_a_timer(storage: Storage) -> None:
    run = Pipeline(timer_bot(), storage, ME, Metrics())
    chat = Chat(run)
    await chat.say("in 3600 name=daily")
    await chat.say("in 0 name=daily")  # the same name: moved to now
    await chat.say("in 0 name=other")
    await chat.say("cancel other")
    fired = await fire_due(run)
    assert [texts(f) for f in fired] == [["ping name=daily, 0 s late"]]
    assert await fire_due(run) == []


async def test_scheduling_in_the_optimistic_mode_runs_the_update_with_locks_once(
    storage_mode: tuple[Storage, bool],
) -> None:
    storage, optimistic = storage_mode
    run = Pipeline(timer_bot(), storage, ME, Metrics(), optimistic=optimistic)
    await Chat(run).say("in 0 a")
    [fired] = await fire_due(run)
    assert texts(fired) == ["ping a, 0 s late"]
    assert await log_of(storage) == '{"fired":["a"]}'


class RecordingStorage(MemoryStorage):
    """Records the timer work of each transaction: what an update that schedules nothing must not do."""

    def __init__(self) -> None:
        super().__init__()
        self.timer_work: list[str] = []

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_MemoryTransaction]:
        async with super().transaction() as tx:
            schedule = tx.schedule

            async def recorded(bot_id: int, changes: Sequence[TimerChange]) -> None:
                self.timer_work.append("schedule")
                await schedule(bot_id, changes)

            tx.schedule = recorded  # type: ignore[method-assign]
            yield tx


async def test_an_update_that_schedules_nothing_does_no_timer_work() -> None:
    storage = RecordingStorage()
    run = Pipeline(timer_bot(), storage, ME, Metrics())
    chat = Chat(run)
    assert texts(await chat.say("look")) == ["nothing"]
    assert storage.timer_work == []
    await chat.say("in 5 a")
    assert storage.timer_work == ["schedule"]


async def round_trips(
    database_url: str, bot: Bot[Log], optimistic: bool, chat_id: int, said: Sequence[str]
) -> list[int]:
    """Statements sent (each a round trip) by each message said in the chat."""
    sent: list[str] = []
    storage = await PostgresStorage.connect(database_url, min_size=1, max_size=1)
    async with storage.pool.acquire() as conn:  # the only connection: it stays logged
        conn.add_query_logger(lambda q: sent.append(q.query))
    try:
        chat = Chat(Pipeline(bot, storage, ME, Metrics(), optimistic=optimistic))
        chat.update_id = 1000 * abs(chat_id)
        counted = []
        for message in said:
            sent.clear()
            assert (await chat.say(message, chat=chat_id)).status is Status.APPLIED
            counted.append(len(sent))
        return counted
    finally:
        await storage.close()


@pytest.mark.parametrize("optimistic", [False, True], ids=["locked", "optimistic"])
async def test_updates_that_use_no_timer_cost_what_they_cost_in_a_bot_without_timers(
    database_url: str, optimistic: bool
) -> None:
    """A bot with a timer handler and a dialog against the same bot without: what an update does not
    use costs it nothing. Scheduling costs no round trip of its own with locks (it rides with the
    COMMIT); optimistically it gives up before its statement and takes the lock, having sent nothing
    (the chat's "look"s left it remembered: no row)."""
    plain = timer_bot()
    plain.timers.clear()
    with_timers = timer_bot()
    with_timers.include_router(Dialog(Steps, timeout=60))
    baseline = await round_trips(database_url, plain, optimistic, -1, ["look", "look"])
    counted = await round_trips(database_url, with_timers, optimistic, -2, ["look", "look", "in 3600 x"])
    assert counted[:2] == baseline
    assert counted[2] == 3


@pytest.mark.parametrize("optimistic", [False, True], ids=["locked", "optimistic"])
async def test_a_fire_runs_as_an_update_does_in_one_round_trip_when_its_session_is_remembered(
    database_url: str, optimistic: bool
) -> None:
    """With locks, a fire's claim rides with BEGIN, then its session is locked and read, then its reply
    is queued with the writes, then COMMIT. Without, one statement claims (deletes) the timer, checks the
    session read or remembered and writes it, and queues the reply, as for an update."""
    sent: list[str] = []
    storage = await PostgresStorage.connect(database_url, min_size=1, max_size=1)
    async with storage.pool.acquire() as conn:  # the only connection: it stays logged
        conn.add_query_logger(lambda q: sent.append(q.query))
    try:
        run = Pipeline(timer_bot(), storage, ME, Metrics(), optimistic=optimistic)
        chat = Chat(run)
        await chat.say("in 0 a")
        await chat.say("in 0 b")
        counted = []
        for tag in ("a", "b"):
            [due] = await storage.claim_due_timers(ME.id, 10, 30.0)
            sent.clear()
            fired = await run.fire(due)
            assert (fired.status, texts(fired)) == (Status.APPLIED, [f"ping {tag}, 0 s late"])
            counted.append(len(sent))
        # (Optimistic: the chat has no session row, which the updates that scheduled left remembered, so
        # the first fire's statement checks that and creates it; the second remembers it.)
        assert counted == ([1, 1] if optimistic else [4, 4])
        assert await log_of(storage) == '{"fired":["a","b"]}'
    finally:
        await storage.close()


@pytest.mark.parametrize("optimistic", [False, True], ids=["locked", "optimistic"])
async def test_two_processes_firing_one_timer_at_once_apply_it_once(
    database_url: str, optimistic: bool
) -> None:
    """Its lease ran out while the first process was firing it, so a second one fires it too, both with
    the session remembered: one applies it and queues its reply, the other finds it fired."""
    first, second = [await PostgresStorage.connect(database_url) for _ in range(2)]
    try:
        runs = [Pipeline(timer_bot(), s, ME, Metrics(), optimistic=optimistic) for s in (first, second)]
        await Chat(runs[0]).say("in 0 a")
        for n, run in enumerate(runs):
            await run.process(text_update(100 + n, CHAT, "look", from_id=ANN))  # remembered by each
        [due] = await first.claim_due_timers(ME.id, 10, 30.0)
        fired = await asyncio.gather(*(run.fire(due) for run in runs))
        assert sorted((f.status.value, tuple(texts(f))) for f in fired) == sorted(
            [(Status.APPLIED.value, ("ping a, 0 s late",)), (Status.DUPLICATE.value, ())]
        )
        assert await log_of(first) == '{"fired":["a"]}'
        assert await first.claim_due_timers(ME.id, 10, 0.0) == []
    finally:
        for storage in (first, second):
            await storage.close()


class Steps(StatesGroup):
    one = State()


async def test_the_loop_fires_work_right_after_the_commit_that_scheduled_it() -> None:
    storage = MemoryStorage()
    run = Pipeline(timer_bot(), storage, ME, Metrics())
    outbox = Outbox(storage, None, run.metrics)
    loop = TimerLoop(run, outbox, lease=30.0, interval=3600.0)  # no polling: only the wake-up
    run.on_schedule = loop.wake
    firing = asyncio.create_task(loop.run())
    try:
        await asyncio.sleep(0.05)  # its first look found nothing; the next is an hour away
        await Chat(run).say("in 0 job")
        for _ in range(100):
            if await log_of(storage) == '{"fired":["job"]}':
                break
            await asyncio.sleep(0.02)
        assert await log_of(storage) == '{"fired":["job"]}'
    finally:
        firing.cancel()
        await asyncio.gather(firing, return_exceptions=True)
        await loop.drain(1.0)


@asynccontextmanager
async def hanging_timers(
    lease: float, interval: float
) -> AsyncIterator[tuple[Chat, MemoryStorage, list[int]]]:
    """A timer bot whose "hang" schedules a "hang" timer that never ends, fired by one slot (the update
    ids of the fires started are listed); its chat, storage and that list."""
    bot = timer_bot()
    started: list[int] = []
    never = asyncio.Event()

    @bot.message(text(equals="hang"))
    async def schedule_hang(ctx: Context[Log]) -> None:
        ctx.schedule("hang", after=0)

    @bot.timer("hang")
    async def hang(ctx: Context[Log]) -> None:
        started.append(ctx.update.update_id)
        await never.wait()

    storage = MemoryStorage()
    run = Pipeline(bot, storage, ME, Metrics())
    loop = TimerLoop(run, Outbox(storage, None, run.metrics), lease=lease, interval=interval, concurrency=1)
    run.on_schedule = loop.wake
    firing = asyncio.create_task(loop.run())
    try:
        yield Chat(run), storage, started
    finally:
        firing.cancel()
        await asyncio.gather(firing, return_exceptions=True)
        await loop.drain(0.1)


async def test_a_fire_that_never_ends_holds_no_slot_past_its_lease_and_is_not_fired_again_meanwhile() -> None:
    """A fire has no deadline (long work goes there), but it held its TIMER_CONCURRENCY slot for as long
    as it ran, and its timer, picked again each time its lease ran out, took the next slot: a handler
    awaiting what never comes (an HTTP call without a timeout) stopped every chat's timers in the
    process. A fire still running at the end of its lease no longer counts against the slots, and a
    timer firing here is not fired again here meanwhile."""
    async with hanging_timers(lease=0.3, interval=0.05) as (chat, storage, started):
        await chat.say("hang", chat=CHAT)
        await asyncio.sleep(0.1)
        await chat.say("in 0 job", chat=CHAT - 1)
        for _ in range(100):
            if await log_of(storage, CHAT - 1) == '{"fired":["job"]}':
                break
            await asyncio.sleep(0.02)
        assert await log_of(storage, CHAT - 1) == '{"fired":["job"]}'
        await asyncio.sleep(0.7)  # two more leases of the hanging timer
        assert len(started) == 1


async def test_fires_that_never_end_are_bounded_when_every_one_hangs() -> None:
    """Past its lease a fire stops counting against the slots (above), but with locks each holds a
    pooled connection: a handler that hangs every time started one more fire per lease, without end,
    until the updates of every chat found no connection. Only `concurrency` fires past their lease go
    uncounted: at most that many more than the slots' picks (PICKED_PER_SLOT each) ever run at once."""
    async with hanging_timers(lease=0.1, interval=0.02) as (chat, _, started):
        for n in range(12):
            await chat.say("hang", chat=CHAT - n)
        await asyncio.sleep(1.6)  # sixteen leases: one more fire each, before
        assert 2 <= len(started) <= 1 + PICKED_PER_SLOT


async def test_draining_waits_for_fires_under_way_and_cancels_what_outlives_the_wait() -> None:
    bot = timer_bot()
    started, release = asyncio.Event(), asyncio.Event()

    @bot.timer("slow")
    async def slow(ctx: Context[Log]) -> None:
        started.set()
        await release.wait()
        ctx.session.fired.append("slow")

    storage = MemoryStorage()
    run = Pipeline(bot, storage, ME, Metrics())
    loop = TimerLoop(run, Outbox(storage, None, run.metrics), lease=30.0, interval=3600.0)
    async with storage.transaction() as tx:
        origin = '{"message_id": 0, "date": 0, "chat": {"id": -100, "type": "group"}}'
        await tx.schedule(ME.id, [TimerChange("-100", "a", "slow", "null", origin, after=0)])
    await loop.fire_due()
    await asyncio.wait_for(started.wait(), 10)
    asyncio.get_running_loop().call_later(0.1, release.set)
    await loop.drain(5.0)
    assert await log_of(storage) == '{"fired":["slow"]}', "a fire under way finishes"

    release.clear()
    started.clear()
    async with storage.transaction() as tx:
        await tx.schedule(ME.id, [TimerChange("-100", "b", "slow", "null", origin, after=0)])
    await loop.fire_due()
    await asyncio.wait_for(started.wait(), 10)
    await loop.drain(0.1)
    assert await log_of(storage) == '{"fired":["slow"]}', "one that outlives the wait is rolled back"
    assert [t.name for t in await storage.claim_due_timers(ME.id, 10, 30.0)] == [], "leased, still there"
    assert len(storage._timers) == 1


async def test_a_timer_whose_handler_was_removed_from_the_code_is_kept_as_failed() -> None:
    storage = MemoryStorage()
    run = Pipeline(timer_bot(), storage, ME, Metrics())
    async with storage.transaction() as tx:
        await tx.schedule(ME.id, [TimerChange("-100", "x", "gone", "null", "null", after=0)])
    [due] = await storage.claim_due_timers(ME.id, 10, 30.0)
    assert (await run.fire(due)).status is Status.DEAD_LETTER
    assert (
        storage._timers[due.id].failed == "NoSuchTimerHandler: no timer handler 'gone' (registered: ['ping'])"
    )


async def test_only_a_bot_with_timer_handlers_runs_a_timer_loop(
    database_url: str, telegram_root: str
) -> None:
    settings = make_settings(database_url, telegram_root)
    async with start(settings, bot=Bot(session(initial=Log)), storage=MemoryStorage()) as runtime:
        assert runtime.timers is None and runtime.pipeline.on_schedule is None
    async with start(settings, bot=timer_bot(), storage=MemoryStorage()) as runtime:
        assert runtime.timers is not None and runtime.pipeline.on_schedule == runtime.timers.wake


async def test_a_fire_failing_transiently_is_tried_again_then_given_up_on() -> None:
    bot = timer_bot()

    @bot.timer("flaky")
    async def flaky(ctx: Context[Log]) -> None:
        raise TimeoutError("the Bot API did not answer in time")

    storage = MemoryStorage()
    run = Pipeline(bot, storage, ME, Metrics(), give_up=TransientFailures(deliveries=2, seconds=0))
    async with storage.transaction() as tx:
        origin = '{"message_id": 0, "date": 0, "chat": {"id": -100, "type": "group"}}'
        await tx.schedule(ME.id, [TimerChange("-100", "x", "flaky", "null", origin, after=0)])
    [due] = await storage.claim_due_timers(ME.id, 10, 0.0)
    with pytest.raises(TryLater):
        await run.fire(due)
    [again] = await storage.claim_due_timers(ME.id, 10, 30.0)  # still there, its lease run out
    assert (await run.fire(again)).status is Status.DEAD_LETTER
    failed = storage._timers[again.id].failed
    assert failed is not None and failed.startswith("gave up after 2 transient failures")
    assert await storage.claim_due_timers(ME.id, 10, 0.0) == []
