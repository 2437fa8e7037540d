"""The pipeline's own memory: redeliveries this process can answer without the database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from bot import redelivery
from bot.context import BotIdentity, Context
from bot.dispatch import Bot
from bot.filters import text
from bot.metrics import Metrics
from bot.pipeline import Pipeline, Status
from bot.session import session
from bot.storage import Storage, Transaction
from bot.storage.memory import MemoryStorage
from bot.storage.postgres import PostgresStorage
from bot.testing.updates import text_update

pytestmark = pytest.mark.anyio

ME = BotIdentity(1, "pizza_bot")


@dataclass
class Counted:
    count: int = 0


class CountingStorage(MemoryStorage):
    """A MemoryStorage that counts the transactions it hands out: the database work of an update."""

    def __init__(self) -> None:
        super().__init__()
        self.transactions = 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        self.transactions += 1
        async with super().transaction() as tx:
            yield tx


def slow_counting_bot(gate: asyncio.Event | None = None) -> Bot[Counted]:
    bot: Bot[Counted] = Bot(session(Counted))

    @bot.message(text(equals="+"))
    async def plus(ctx: Context[Counted]) -> None:
        if gate is not None:
            await gate.wait()
        ctx.session.count += 1

    @bot.message(text(equals="look"))
    async def look(ctx: Context[Counted]) -> None:
        ctx.reply(str(ctx.session.count))

    return bot


async def count(storage: Storage, key: str = "-1") -> str | None:
    async with storage.transaction() as tx:
        stored = await tx.read(key)
    return None if stored is None else stored.data.replace(" ", "")


async def test_a_redelivery_of_an_update_applied_here_without_replies_does_no_database_work() -> None:
    storage = CountingStorage()
    run = Pipeline(slow_counting_bot(), storage, ME, Metrics())
    assert (await run.process(text_update(1, -1, "+"))).status is Status.APPLIED
    used = storage.transactions
    again = await run.process(text_update(1, -1, "+"))
    assert (again.status, again.to_send) == (Status.DUPLICATE, [])
    assert storage.transactions == used
    assert await count(storage) == '{"count":1}'


async def test_a_redelivery_of_an_update_with_replies_still_asks_the_storage_for_unsent_ones() -> None:
    storage = CountingStorage()
    run = Pipeline(slow_counting_bot(), storage, ME, Metrics(), lease=0.0)
    first = await run.process(text_update(1, -1, "look"))
    assert [c.params["text"] for c in first.to_send] == ["0"]
    used = storage.transactions
    again = await run.process(text_update(1, -1, "look"))  # its reply was never confirmed sent
    assert again.status is Status.DUPLICATE
    assert [c.params["text"] for c in again.to_send] == ["0"]
    assert storage.transactions == used + 1


async def test_a_redelivery_overlapping_its_first_attempt_waits_for_it_and_is_a_duplicate() -> None:
    gate = asyncio.Event()
    storage = CountingStorage()
    run = Pipeline(slow_counting_bot(gate), storage, ME, Metrics())
    first = asyncio.create_task(run.process(text_update(1, -1, "+")))
    second = asyncio.create_task(run.process(text_update(1, -1, "+")))
    await asyncio.sleep(0.01)
    assert storage.transactions == 1  # the second has not started: it waits for the first
    gate.set()
    assert [(await first).status, (await second).status] == [Status.APPLIED, Status.DUPLICATE]
    assert storage.transactions == 1
    assert await count(storage) == '{"count":1}'


async def test_an_overlapping_redelivery_of_a_failed_attempt_applies_it() -> None:
    """The first attempt's storage failed (503): the one waiting behind it is the one that applies."""
    gate = asyncio.Event()
    run = Pipeline(slow_counting_bot(gate), MemoryStorage(), ME, Metrics())
    first = asyncio.create_task(run.process(text_update(1, -1, "+")))
    second = asyncio.create_task(run.process(text_update(1, -1, "+")))
    await asyncio.sleep(0.01)
    first.cancel()  # the request deadline, say
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await second).status is Status.APPLIED
    assert await count(run.storage) == '{"count":1}'


async def test_an_applied_update_is_remembered_only_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redelivery, "KEEP_APPLIED_FOR", 0.0)
    storage = CountingStorage()
    run = Pipeline(slow_counting_bot(), storage, ME, Metrics())
    await run.process(text_update(1, -1, "+"))
    used = storage.transactions
    assert (await run.process(text_update(1, -1, "+"))).status is Status.DUPLICATE
    assert storage.transactions == used + 1  # asked the storage, which still knows it


async def test_a_hot_chat_waiting_on_its_row_with_locks_leaves_the_pool_to_other_chats(
    database_url: str,
) -> None:
    """With locks (DB_CONCURRENCY=locked, and every optimistic attempt that gives way: a redelivery, a
    chat other processes write), each of a hot chat's concurrent updates took a pooled connection and
    waited on the chat's row with it. A slow handler there (a `ctx.api` call) and a few button presses
    at once held every connection: another chat's update waited DB_ACQUIRE_TIMEOUT and got a 503. A
    chat's updates now take turns in the process before they take a connection."""
    storage = await PostgresStorage.connect(database_url, max_size=3, acquire_timeout=0.3)
    bot: Bot[Counted] = Bot(session(Counted))

    @bot.message(text(equals="slow"))
    async def slow(ctx: Context[Counted]) -> None:
        ctx.session.count += 1
        await asyncio.sleep(0.4)

    @bot.message(text(equals="+"))
    async def plus(ctx: Context[Counted]) -> None:
        ctx.session.count += 1

    try:
        run = Pipeline(bot, storage, ME, Metrics())  # with locks
        hot = [asyncio.ensure_future(run.process(text_update(10 + n, -1, "slow"))) for n in range(6)]
        await asyncio.sleep(0.1)
        assert (await run.process(text_update(1, -2, "+"))).status is Status.APPLIED
        assert {o.status for o in await asyncio.gather(*hot)} == {Status.APPLIED}
        assert (await count(storage), await count(storage, "-2")) == ('{"count":6}', '{"count":1}')
    finally:
        await storage.close()
