"""The session layer's promises, counted in storage calls (as grammY's own tests do), on both storages."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from bot.context import BotIdentity, Context
from bot.dispatch import Bot
from bot.metrics import Metrics
from bot.pipeline import Pipeline, Status
from bot.session import NoSessionKey, SessionDecodeError, session
from bot.storage import OutgoingCall, PendingCall, Storage, StoredSession, Transaction
from bot.storage.memory import MemoryStorage
from bot.telegram import Update, decode_update
from bot.testing.updates import encode, message_update, text_update

pytestmark = pytest.mark.anyio

ME = BotIdentity(42, "pizza_bot")


@dataclass
class Counted:
    count: int = 0
    tags: list[str] = field(default_factory=list)


@dataclass
class Pizza:
    count: int = 0
    last_at: int | None = None


@dataclass
class PizzaV2:
    pizza: Pizza = field(default_factory=Pizza)


class CountingStorage:
    """Wraps a real storage and counts what the session layer asks of it, per (operation, key)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.ops: Counter[tuple[str, str]] = Counter()

    def count(self, op: str) -> int:
        return sum(n for (o, _), n in self.ops.items() if o == op)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self.inner.transaction() as tx:
            yield _CountingTransaction(tx, self.ops)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _CountingTransaction:
    def __init__(self, tx: Transaction, ops: Counter[tuple[str, str]]) -> None:
        self.tx, self.ops = tx, ops

    async def claim_update(self, bot_id: int, update_id: int) -> bool:
        self.ops["claim", str(update_id)] += 1
        return await self.tx.claim_update(bot_id, update_id)

    async def read(self, key: str) -> StoredSession | None:
        self.ops["read", key] += 1
        return await self.tx.read(key)

    async def write(self, key: str, session: StoredSession, ttl: float | None = None) -> None:
        self.ops["write", key] += 1
        await self.tx.write(key, session, ttl)

    async def delete(self, key: str) -> None:
        self.ops["delete", key] += 1
        await self.tx.delete(key)

    async def enqueue(
        self, bot_id: int, update_id: int, calls: Sequence[OutgoingCall], lease: float
    ) -> list[PendingCall]:
        return await self.tx.enqueue(bot_id, update_id, calls, lease)

    async def claim_unsent(self, bot_id: int, update_id: int, lease: float) -> list[PendingCall]:
        return await self.tx.claim_unsent(bot_id, update_id, lease)


@pytest.fixture
def counting(storage: Storage) -> CountingStorage:
    return CountingStorage(storage)


def pipeline(bot: Bot[Any], storage: Any) -> Pipeline:
    return Pipeline(bot, storage, ME, Metrics())


def counter_bot(**options: Any) -> Bot[Counted]:
    bot: Bot[Counted] = Bot(session(Counted, **options))

    @bot.on_message(lambda m: m.text == "+")
    async def plus(ctx: Context[Counted]) -> None:
        (await ctx.get_session()).count += 1

    @bot.on_message(lambda m: m.text == "look")
    async def look(ctx: Context[Counted]) -> None:
        ctx.reply(str((await ctx.get_session()).count))

    @bot.on_message(lambda m: m.text == "forget")
    async def forget(ctx: Context[Counted]) -> None:
        await ctx.get_session()
        ctx.session = None

    @bot.on_message(lambda m: m.text == "nothing")
    async def nothing(ctx: Context[Counted]) -> None:
        return None

    return bot


async def stored(storage: Storage, key: str) -> StoredSession | None:
    async with storage.transaction() as tx:
        return await tx.read(key)


async def test_changed_session_is_read_once_and_written_once(counting: CountingStorage) -> None:
    run = pipeline(counter_bot(), counting)
    assert (await run.process(text_update(1, chat_id=7, text="+"))).status is Status.APPLIED
    assert counting.ops == {("claim", "1"): 1, ("read", "7"): 1, ("write", "7"): 1}
    saved = await stored(counting.inner, "7")
    assert saved is not None
    assert json.loads(saved.data) == {"count": 1, "tags": []}


async def test_unchanged_session_is_not_written(counting: CountingStorage) -> None:
    run = pipeline(counter_bot(), counting)
    await run.process(text_update(1, chat_id=7, text="+"))
    counting.ops.clear()
    await run.process(text_update(2, chat_id=7, text="look"))
    assert counting.count("read") == 1
    assert counting.count("write") == 0


async def test_new_session_left_at_its_initial_value_is_not_stored(counting: CountingStorage) -> None:
    await pipeline(counter_bot(), counting).process(text_update(1, chat_id=7, text="look"))
    assert counting.count("write") == 0
    assert await stored(counting.inner, "7") is None


async def test_session_set_to_none_is_deleted(counting: CountingStorage) -> None:
    run = pipeline(counter_bot(), counting)
    await run.process(text_update(1, chat_id=7, text="+"))
    await run.process(text_update(2, chat_id=7, text="forget"))
    assert counting.ops["delete", "7"] == 1
    assert await stored(counting.inner, "7") is None


async def test_key_none_means_no_session_and_no_storage_work(counting: CountingStorage) -> None:
    bot: Bot[Counted] = Bot(session(Counted, get_session_key=lambda update: None))
    seen: list[str] = []

    @bot.on_message(lambda m: True)
    async def handler(ctx: Context[Counted]) -> None:
        with pytest.raises(NoSessionKey, match="get_session_key returned None"):
            ctx.session.count += 1
        seen.append("ran")

    assert (
        await pipeline(bot, counting).process(text_update(1, chat_id=7, text="+"))
    ).status is Status.APPLIED
    assert seen == ["ran"]
    assert counting.ops == {}


async def test_initial_builds_a_fresh_object_per_chat(counting: CountingStorage) -> None:
    bot: Bot[Counted] = Bot(session(Counted))

    @bot.on_message(lambda m: True)
    async def tag(ctx: Context[Counted]) -> None:
        ctx.session.tags.append(str(ctx.update.update_id))

    run = pipeline(bot, counting)
    await run.process(text_update(1, chat_id=7, text="a"))
    await run.process(text_update(2, chat_id=8, text="b"))
    assert [
        json.loads(s.data)["tags"] for s in [await stored(counting.inner, k) for k in ("7", "8")] if s
    ] == [
        ["1"],
        ["2"],
    ]


async def test_prefix_is_part_of_the_stored_key(counting: CountingStorage) -> None:
    await pipeline(counter_bot(prefix="pizza:"), counting).process(text_update(1, chat_id=7, text="+"))
    assert counting.ops["write", "pizza:7"] == 1


async def test_lazy_session_untouched_costs_no_storage_work(counting: CountingStorage) -> None:
    run = pipeline(counter_bot(lazy=True), counting)
    assert (await run.process(text_update(1, chat_id=7, text="nothing"))).status is Status.APPLIED
    assert counting.ops == {}
    await run.process(text_update(2, chat_id=7, text="+"))
    assert counting.ops == {("claim", "2"): 1, ("read", "7"): 1, ("write", "7"): 1}


async def test_eager_session_is_loaded_before_the_handler(counting: CountingStorage) -> None:
    await pipeline(counter_bot(), counting).process(text_update(1, chat_id=7, text="nothing"))
    assert counting.ops == {("claim", "1"): 1, ("read", "7"): 1}


async def test_old_versions_are_upgraded_on_read_and_written_back(counting: CountingStorage) -> None:
    async with counting.inner.transaction() as tx:
        await tx.write("7", StoredSession('{"pizzaCount": 3}', version=0))

    bot: Bot[PizzaV2] = Bot(
        session(
            PizzaV2,
            version=2,
            migrations={
                0: lambda old: {"pizza_count": old["pizzaCount"]},
                1: lambda old: {"pizza": {"count": old["pizza_count"]}},
            },
        )
    )

    @bot.on_message(lambda m: True)
    async def look(ctx: Context[PizzaV2]) -> None:
        ctx.reply(str(ctx.session.pizza.count))

    result = await pipeline(bot, counting).process(text_update(1, chat_id=7, text="look"))
    assert [c.params["text"] for c in result.to_send] == ["3"]
    saved = await stored(counting.inner, "7")
    assert saved is not None
    assert saved.version == 2
    assert json.loads(saved.data)["pizza"]["count"] == 3  # the new shape


async def test_undecodable_session_fails_the_update_naming_the_key(
    counting: CountingStorage, caplog: pytest.LogCaptureFixture
) -> None:
    async with counting.inner.transaction() as tx:
        await tx.write("7", StoredSession('{"count": "many"}'))
    result = await pipeline(counter_bot(), counting).process(text_update(1, chat_id=7, text="+"))
    assert result.status is Status.FAILED
    assert "session '7'" in caplog.text
    assert SessionDecodeError.__name__ in caplog.text
    saved = await stored(counting.inner, "7")
    assert saved is not None and json.loads(saved.data) == {"count": "many"}  # untouched, not overwritten


async def test_ttl_expired_session_reads_as_new(counting: CountingStorage) -> None:
    run = pipeline(counter_bot(ttl=0.2), counting)
    await run.process(text_update(1, chat_id=7, text="+"))
    await run.process(text_update(2, chat_id=7, text="+"))
    first = await run.process(text_update(3, chat_id=7, text="look"))
    await asyncio.sleep(0.5)
    second = await run.process(text_update(4, chat_id=7, text="look"))
    assert [c.params["text"] for c in first.to_send + second.to_send] == ["2", "0"]


async def test_concurrent_updates_of_one_chat_lose_no_increment(storage: Storage) -> None:
    run = pipeline(counter_bot(), storage)
    results = await asyncio.gather(*(run.process(text_update(i, chat_id=7, text="+")) for i in range(200)))
    assert {r.status for r in results} == {Status.APPLIED}
    saved = await stored(storage, "7")
    assert saved is not None and json.loads(saved.data)["count"] == 200


async def test_redelivered_update_is_applied_once_and_replies_once(storage: Storage) -> None:
    run = pipeline(counter_bot(), storage)
    first, again = await asyncio.gather(
        run.process(text_update(1, chat_id=7, text="+")), run.process(text_update(1, chat_id=7, text="+"))
    )
    assert sorted([first.status.value, again.status.value]) == ["applied", "duplicate"]
    look = await run.process(text_update(2, chat_id=7, text="look"))
    look_again = await run.process(text_update(2, chat_id=7, text="look"))
    assert [c.params["text"] for c in look.to_send] == ["1"]
    assert look_again.status is Status.DUPLICATE
    assert look_again.to_send == []  # the reply is leased to the first attempt, not sent twice


async def test_handler_bug_rolls_back_and_the_chat_keeps_working(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    bot = counter_bot()

    @bot.on_message(lambda m: m.text == "boom")
    async def boom(ctx: Context[Counted]) -> None:
        ctx.session.count += 100
        ctx.reply("never sent")
        raise RuntimeError("handler bug")

    run = pipeline(bot, storage)
    await run.process(text_update(1, chat_id=7, text="+"))
    failed = await run.process(text_update(2, chat_id=7, text="boom"))
    assert failed.status is Status.FAILED and failed.to_send == []
    assert "update 2: handler failed" in caplog.text and "handler bug" in caplog.text
    assert run.metrics.get("handler_errors_total") == 1
    look = await run.process(text_update(3, chat_id=7, text="look"))
    assert [c.params["text"] for c in look.to_send] == ["1"]


def merging_bot() -> Bot[Counted]:
    bot = counter_bot(merge=lambda old, new: Counted(old.count + new.count))
    return bot


async def test_chat_migration_moves_the_session_once_whichever_message_comes_first(storage: Storage) -> None:
    run = pipeline(merging_bot(), storage)
    for i in range(3):
        await run.process(text_update(i + 1, chat_id=-5, text="+"))
    await run.process(text_update(10, chat_id=-1005, text="+"))
    moved_from = message_update(20, -1005, None, extra={"migrate_from_chat_id": -5})
    moved_to = message_update(21, -5, None, extra={"migrate_to_chat_id": -1005})
    for update in (moved_from, moved_to, moved_from):
        assert (await run.process(decode_update(encode(update)))).status in (Status.APPLIED, Status.DUPLICATE)
    assert await stored(storage, "-5") is None
    look = await run.process(text_update(30, chat_id=-1005, text="look"))
    assert [c.params["text"] for c in look.to_send] == ["4"]


async def test_chat_migration_racing_with_updates_on_both_ids_loses_nothing(storage: Storage) -> None:
    run = pipeline(merging_bot(), storage)
    old_pizzas = [text_update(i, chat_id=-6, text="+") for i in range(1, 101)]
    new_pizzas = [text_update(i, chat_id=-1006, text="+") for i in range(101, 201)]
    # Telegram sends the old chat's messages in order, ending with migrate_to; the new chat's start with
    # migrate_from. The two chats' queues race each other.
    moved_to = decode_update(encode(message_update(300, -6, None, extra={"migrate_to_chat_id": -1006})))
    moved_from = decode_update(encode(message_update(301, -1006, None, extra={"migrate_from_chat_id": -6})))

    async def old_chat() -> None:
        for update in old_pizzas:
            await run.process(update)
        await run.process(moved_to)

    async def new_chat() -> None:
        await run.process(moved_from)
        await asyncio.gather(*(run.process(u) for u in new_pizzas))

    await asyncio.gather(old_chat(), new_chat())
    assert await stored(storage, "-6") is None
    look = await run.process(text_update(400, chat_id=-1006, text="look"))
    assert [c.params["text"] for c in look.to_send] == ["200"]


def user_key(update: Update) -> str | None:
    message = update.new_message
    return None if message is None or message.from_user is None else f"user:{message.from_user.id}"


def multi_bot(user_storage: Storage | None = None) -> Bot[Any]:
    bot: Bot[Any] = Bot(
        sessions={
            "chat": session(Counted),
            "user": session(Counted, get_session_key=user_key, storage=user_storage),
        }
    )

    @bot.on_message(lambda m: m.text == "+")
    async def plus(ctx: Context[Any]) -> None:
        ctx.fragment("chat").count += 1
        ctx.fragment("user").count += 1

    @bot.on_message(lambda m: m.text == "boom")
    async def boom(ctx: Context[Any]) -> None:
        ctx.fragment("chat").count += 1
        ctx.fragment("user").count += 1
        raise RuntimeError("handler bug")

    return bot


def from_user(update_id: int, chat_id: int, user_id: int, text: str) -> Update:
    raw = message_update(update_id, chat_id, text)
    raw["message"]["from"]["id"] = user_id
    return decode_update(encode(raw))


async def count_of(storage: Storage, key: str) -> int:
    saved = await stored(storage, key)
    return 0 if saved is None else int(json.loads(saved.data)["count"])


async def test_multi_sessions_keep_per_chat_and_per_user_counts_exact_under_concurrency(
    storage: Storage,
) -> None:
    run = pipeline(multi_bot(), storage)
    rng = random.Random(3)
    # Five users writing in five chats at once: every update locks a chat row and a user row, in one
    # global order, so no two updates can deadlock on each other's rows.
    updates = [(i, -(1 + rng.randrange(5)), 100 + rng.randrange(5)) for i in range(1, 301)]
    results = await asyncio.gather(*(run.process(from_user(i, c, u, "+")) for i, c, u in updates))
    assert {r.status for r in results} == {Status.APPLIED}
    for chat in range(1, 6):
        assert await count_of(storage, str(-chat)) == sum(1 for _, c, _ in updates if c == -chat)
    for user in range(100, 105):
        assert await count_of(storage, f"user:{user}") == sum(1 for _, _, u in updates if u == user)


async def test_a_session_in_its_own_storage_is_written_there_and_rolled_back_with_the_rest(
    storage: Storage,
) -> None:
    elsewhere = MemoryStorage()
    run = pipeline(multi_bot(user_storage=elsewhere), storage)
    await run.process(from_user(1, -1, 100, "+"))
    await run.process(from_user(2, -1, 100, "+"))
    assert (await count_of(storage, "-1"), await count_of(elsewhere, "user:100")) == (2, 2)
    assert await stored(storage, "user:100") is None
    assert (await run.process(from_user(3, -1, 100, "boom"))).status is Status.FAILED
    assert (await count_of(storage, "-1"), await count_of(elsewhere, "user:100")) == (2, 2)
    # The exactly-once record lives in the bot's storage: a redelivery changes neither storage.
    assert (await run.process(from_user(2, -1, 100, "+"))).status is Status.DUPLICATE
    assert (await count_of(storage, "-1"), await count_of(elsewhere, "user:100")) == (2, 2)


async def test_lazy_fragments_are_loaded_only_when_touched(counting: CountingStorage) -> None:
    bot: Bot[Any] = Bot(
        sessions={
            "chat": session(Counted, lazy=True),
            "user": session(Counted, get_session_key=user_key, lazy=True),
        }
    )

    @bot.on_message(lambda m: True)
    async def only_user(ctx: Context[Any]) -> None:
        (await ctx.get_session("user")).count += 1

    await pipeline(bot, counting).process(from_user(1, -1, 100, "x"))
    assert counting.ops == {("claim", "1"): 1, ("read", "user:100"): 1, ("write", "user:100"): 1}
