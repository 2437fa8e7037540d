"""Optimistic statements of updates that end together, sent in one round trip and one commit
(bot/storage/postgres/batches.py): all of them apply, and one update's failure in the batch costs the
others nothing but a round trip."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from bot.context import BotIdentity, Context
from bot.dispatch import Bot
from bot.filters import text
from bot.metrics import Metrics
from bot.pipeline import Pipeline, Status
from bot.session import session
from bot.storage.postgres import PostgresStorage
from bot.testing.updates import text_update

pytestmark = pytest.mark.anyio

ME = BotIdentity(1, "pizza_bot")
CHATS = range(1, 9)


@dataclass
class Tally:
    count: int = 0
    note: str = ""


def tally_bot() -> Bot[Tally]:
    """ "+" counts in the chat's session, "look" only reads it; "poison" stores a text the database
    refuses (jsonb has no NUL)."""
    bot: Bot[Tally] = Bot(session(Tally))

    @bot.message(text(equals="+"))
    async def plus(ctx: Context[Tally]) -> None:
        ctx.session.count += 1

    @bot.message(text(equals="look"))
    async def look(ctx: Context[Tally]) -> None:
        assert ctx.session.count >= 0

    @bot.message(text(equals="poison"))
    async def poison(ctx: Context[Tally]) -> None:
        ctx.session.note = "\x00"

    return bot


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def storage(direct_or_pooled_url: str, metrics: Metrics) -> AsyncIterator[PostgresStorage]:
    storage = await PostgresStorage.connect(direct_or_pooled_url, min_size=2, max_size=4, metrics=metrics)
    try:
        yield storage
    finally:
        await storage.close()


@pytest.fixture
async def run(storage: PostgresStorage, metrics: Metrics) -> Pipeline[Tally]:
    """The bot, with every chat's session written once, one update after another (each alone): the
    pipeline remembers them, so each next update is the one statement, with no read before it."""
    run = Pipeline(tally_bot(), storage, ME, metrics, optimistic=True)
    for chat in CHATS:
        assert (await run.process(text_update(chat, chat, "+"))).status is Status.APPLIED
    return run


def to_each_chat(*says: str) -> list[Any]:
    """An update for each chat (its id 100 + the chat's), saying `says[n]` in the n-th chat."""
    return [text_update(100 + chat, chat, word) for chat, word in zip(CHATS, says, strict=True)]


async def counts(storage: PostgresStorage) -> dict[int, int]:
    rows = await storage.pool.fetch("SELECT key, (data->>'count')::int AS count FROM sessions")
    return {int(row["key"]): row["count"] for row in rows}


async def transactions_of(storage: PostgresStorage, update_ids: list[int]) -> int:
    """How many transactions claimed these updates (their rows in processed_updates, by xmin)."""
    return int(
        await storage.pool.fetchval(
            "SELECT count(DISTINCT xmin::text) FROM processed_updates WHERE update_id = ANY($1::bigint[])",
            update_ids,
        )
    )


async def test_updates_of_chats_that_end_together_apply_in_one_transaction(
    storage: PostgresStorage, run: Pipeline[Tally]
) -> None:
    """Eight chats' updates at once: eight statements, one commit, every count exact."""
    outcomes = await asyncio.gather(*map(run.process, to_each_chat(*"+" * len(CHATS))))
    assert [o.status for o in outcomes] == [Status.APPLIED] * len(CHATS)
    assert await transactions_of(storage, [100 + chat for chat in CHATS]) == 1
    assert await counts(storage) == {chat: 2 for chat in CHATS}
    assert run.metrics.count("bot_optimistic_conflicts_total") == 0
    assert run.metrics.count("bot_statement_batches_total", outcome="sent") == 1


async def test_new_chats_first_updates_at_once_take_two_round_trips_in_all(direct_or_pooled_url: str) -> None:
    """Eight new chats' first updates at once, on a pool of one connection that logs what is sent: their
    reads go in one round trip, their statements in a second (sixteen, one by one)."""
    sent: list[str] = []
    storage = await PostgresStorage.connect(direct_or_pooled_url, min_size=1, max_size=1)
    try:
        async with storage.pool.acquire() as conn:  # the only connection: it stays logged
            conn.add_query_logger(lambda query: sent.append(query.query))
        run = Pipeline(tally_bot(), storage, ME, Metrics(), optimistic=True)
        outcomes = await asyncio.gather(*map(run.process, to_each_chat(*"+" * len(CHATS))))
        assert [o.status for o in outcomes] == [Status.APPLIED] * len(CHATS)
        assert len(sent) == 2, sent
        assert await counts(storage) == {chat: 1 for chat in CHATS}
    finally:
        await storage.close()


async def test_an_update_another_process_applied_fails_its_batch_alone(
    storage: PostgresStorage, run: Pipeline[Tally], database_url: str
) -> None:
    """Eight chats' "look" (each claims its update and writes nothing) at once; chat 1's was applied
    by another process already, which this one cannot know: its claim fails the batch, which applied
    nothing. Each statement is sent again on its own: chat 1's found a redelivery, the others applied."""
    updates = to_each_chat(*["look"] * len(CHATS))
    other = await PostgresStorage.connect(database_url)
    try:
        elsewhere = Pipeline(tally_bot(), other, ME, Metrics(), optimistic=True)
        assert (await elsewhere.process(updates[0])).status is Status.APPLIED
    finally:
        await other.close()
    outcomes = await asyncio.gather(*map(run.process, updates))
    assert [o.status for o in outcomes] == [Status.DUPLICATE] + [Status.APPLIED] * (len(CHATS) - 1)
    assert await storage.pool.fetchval("SELECT count(*) FROM processed_updates WHERE update_id >= 100") == 8
    assert await counts(storage) == {chat: 1 for chat in CHATS}
    assert run.metrics.count("bot_statement_batches_total", outcome="failed") == 1


async def test_a_value_the_database_refuses_is_a_dead_letter_and_its_batch_applies(
    storage: PostgresStorage, run: Pipeline[Tally]
) -> None:
    """Chat 1 stores a text jsonb refuses: its update alone becomes a dead letter; the other chats'
    updates of its batch apply once."""
    outcomes = await asyncio.gather(*map(run.process, to_each_chat("poison", *"+" * (len(CHATS) - 1))))
    assert [o.status for o in outcomes] == [Status.DEAD_LETTER] + [Status.APPLIED] * (len(CHATS) - 1)
    assert await counts(storage) == {1: 1} | {chat: 2 for chat in CHATS[1:]}


async def test_a_row_locked_elsewhere_holds_up_only_its_own_update(
    storage: PostgresStorage, run: Pipeline[Tally], database_url: str
) -> None:
    """Chat 1's row is locked by another transaction (a locking update of another process, with a slow
    handler) for longer than the batch waits for a lock: the other chats' updates of its batch apply
    meanwhile; chat 1's, sent alone, waits for the lock as it would have without the batch, and applies
    once it is free."""
    holder = await asyncpg.connect(database_url)
    try:
        locked = holder.transaction()
        await locked.start()
        await holder.execute("SELECT FROM sessions WHERE key = '1' FOR UPDATE")
        tasks = [asyncio.ensure_future(run.process(u)) for u in to_each_chat(*"+" * len(CHATS))]
        done, _ = await asyncio.wait(tasks[1:], timeout=3)
        assert len(done) == len(CHATS) - 1 and not tasks[0].done()
        await locked.commit()
        assert (await tasks[0]).status is Status.APPLIED
    finally:
        await holder.close()
    assert [task.result().status for task in tasks[1:]] == [Status.APPLIED] * (len(CHATS) - 1)
    assert await counts(storage) == {chat: 2 for chat in CHATS}


async def test_each_update_of_a_batch_gets_its_own_answer(
    storage: PostgresStorage, run: Pipeline[Tally]
) -> None:
    """Chat 1's session was written by another process since this one remembered it: in the batch, its
    statement alone applies nothing (no error: the batch commits the others). Each update reads its own
    statement's answer: chat 1's is refused and runs again, the others applied; taking another's
    answer would report chat 1's update applied with nothing stored, or run another chat's twice."""
    await storage.pool.execute("UPDATE sessions SET data = '{\"count\": 10}' WHERE key = '1'")
    outcomes = await asyncio.gather(*map(run.process, to_each_chat(*"+" * len(CHATS))))
    assert [o.status for o in outcomes] == [Status.APPLIED] * len(CHATS)
    assert await counts(storage) == {1: 11} | {chat: 2 for chat in CHATS[1:]}
    assert run.metrics.count("bot_optimistic_conflicts_total") == 1


async def test_an_update_cancelled_while_its_batch_runs_is_applied_once_and_the_others_apply(
    storage: PostgresStorage, run: Pipeline[Tally], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chat 1's request is cancelled (its deadline, a shutdown) while its statement is in a batch under
    way: the other chats' updates of the batch still get their answers and apply, and chat 1's, which
    the batch applied, is a duplicate when Telegram delivers it again: counted once."""
    batches = storage.batches
    started, go = asyncio.Event(), asyncio.Event()
    send = batches._run

    async def held(*args: Any) -> Any:
        started.set()
        await go.wait()
        return await send(*args)

    monkeypatch.setattr(batches, "_run", held)
    updates = to_each_chat(*"+" * len(CHATS))
    tasks = [asyncio.ensure_future(run.process(u)) for u in updates]
    await asyncio.wait_for(started.wait(), 3)
    tasks[0].cancel()
    go.set()
    done, _ = await asyncio.wait(tasks[1:], timeout=3)
    assert len(done) == len(CHATS) - 1
    assert [task.result().status for task in tasks[1:]] == [Status.APPLIED] * (len(CHATS) - 1)
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    monkeypatch.undo()
    assert (await run.process(updates[0])).status in (Status.APPLIED, Status.DUPLICATE)
    assert await counts(storage) == {chat: 2 for chat in CHATS}


async def test_an_update_that_read_its_session_is_not_held_up_by_another_chats_slow_handler(
    direct_or_pooled_url: str,
) -> None:
    """One connection. Chat 1's update reads its session (the connection is its own from then on);
    chat 2's arrives and waits for the connection, gets it once chat 1's is done, and its handler is
    slow. Chat 1's statement, alone in its turn, goes on the connection it read on: it does not wait for
    chat 2's handler (until the pool's wait limit, then a 503)."""
    entered, one_may_go, two_in, two_may_go = (asyncio.Event() for _ in range(4))
    bot: Bot[Tally] = Bot(session(Tally))

    @bot.message(text(equals="one"))
    async def one(ctx: Context[Tally]) -> None:
        entered.set()
        await one_may_go.wait()
        ctx.session.count += 1

    @bot.message(text(equals="two"))
    async def two(ctx: Context[Tally]) -> None:
        two_in.set()
        await two_may_go.wait()
        ctx.session.count += 1

    storage = await PostgresStorage.connect(direct_or_pooled_url, min_size=1, max_size=1)
    try:
        run = Pipeline(bot, storage, ME, Metrics(), optimistic=True)
        first = asyncio.ensure_future(run.process(text_update(1, 1, "one")))
        await asyncio.wait_for(entered.wait(), 3)
        second = asyncio.ensure_future(run.process(text_update(2, 2, "two")))
        await asyncio.sleep(0.05)  # chat 2's read waits for the connection
        one_may_go.set()
        assert (await asyncio.wait_for(asyncio.shield(first), 2)).status is Status.APPLIED
        assert not second.done()
        await asyncio.wait_for(two_in.wait(), 3)
        two_may_go.set()
        assert (await second).status is Status.APPLIED
        assert await counts(storage) == {1: 1, 2: 1}
    finally:
        two_may_go.set()
        await asyncio.gather(first, second, return_exceptions=True)
        await storage.close()
