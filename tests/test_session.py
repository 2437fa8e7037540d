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
from bot.failures import TryLater
from bot.filters import text
from bot.metrics import Metrics
from bot.outbox import Outbox
from bot.pipeline import Pipeline, Status
from bot.session import (
    NoSessionKey,
    NoSuchSession,
    SessionError,
    SessionNotLoaded,
    session,
    user_key,
)
from bot.storage import (
    DeadLetter,
    Moved,
    OutgoingCall,
    PendingCall,
    Storage,
    StorageUnavailable,
    StoredSession,
    Transaction,
)
from bot.storage.memory import MemoryStorage
from bot.telegram import decode_update
from bot.testing.updates import encode, message_update, text_update
from bot.types import Update

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
    """Wraps a real storage and counts what the session layer asks of it, per (operation, key); `log`
    keeps the order (it may be shared by several wrapped storages)."""

    def __init__(self, inner: Storage, log: list[tuple[str, str]] | None = None) -> None:
        self.inner = inner
        self.ops: Counter[tuple[str, str]] = Counter()
        self.log = [] if log is None else log

    def count(self, op: str) -> int:
        return sum(n for (o, _), n in self.ops.items() if o == op)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self.inner.transaction() as tx:
            yield _CountingTransaction(tx, self.ops, self.log)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _CountingTransaction:
    """A transaction as a storage written outside this project might be: without the optional
    `expect` hint, which the pipeline then does not give."""

    def __init__(self, tx: Transaction, ops: Counter[tuple[str, str]], log: list[tuple[str, str]]) -> None:
        self.tx, self.ops, self.log = tx, ops, log

    def _count(self, op: str, key: str) -> None:
        self.ops[op, key] += 1
        self.log.append((op, key))

    async def claim_update(self, bot_id: int, update_id: int) -> bool:
        self._count("claim", str(update_id))
        return await self.tx.claim_update(bot_id, update_id)

    async def read(self, key: str) -> StoredSession | Moved | None:
        self._count("read", key)
        return await self.tx.read(key)

    async def write(self, key: str, session: StoredSession, ttl: float | None = None) -> None:
        self._count("write", key)
        await self.tx.write(key, session, ttl)

    async def delete(self, key: str) -> None:
        self._count("delete", key)
        await self.tx.delete(key)

    async def move(self, key: str, to: str, keep: float) -> None:
        self._count("move", key)
        await self.tx.move(key, to, keep)

    async def enqueue(
        self, bot_id: int, update_id: int, calls: Sequence[OutgoingCall], lease: float
    ) -> list[PendingCall]:
        return await self.tx.enqueue(bot_id, update_id, calls, lease)

    async def claim_unsent(self, bot_id: int, update_id: int, lease: float) -> list[PendingCall]:
        return await self.tx.claim_unsent(bot_id, update_id, lease)

    async def dead_letter(self, bot_id: int, letter: DeadLetter) -> None:
        self._count("dead letter", str(letter.update_id))
        await self.tx.dead_letter(bot_id, letter)

    async def take_dead_letter(self, bot_id: int, update_id: int) -> DeadLetter | None:
        return await self.tx.take_dead_letter(bot_id, update_id)


@pytest.fixture
def counting(storage: Storage) -> CountingStorage:
    return CountingStorage(storage)


def pipeline(bot: Bot[Any], storage: Any, *, optimistic: bool = False) -> Pipeline:
    return Pipeline(bot, storage, ME, Metrics(), optimistic=optimistic)


def counter_bot(**options: Any) -> Bot[Counted]:
    bot: Bot[Counted] = Bot(session(Counted, **options))

    @bot.message(text(equals="+"))
    async def plus(ctx: Context[Counted]) -> None:
        (await ctx.get_session()).count += 1

    @bot.message(text(equals="look"))
    async def look(ctx: Context[Counted]) -> None:
        ctx.reply(str((await ctx.get_session()).count))

    @bot.message(text(equals="forget"))
    async def forget(ctx: Context[Counted]) -> None:
        await ctx.get_session()
        ctx.session = None

    @bot.message(text(equals="nothing"))
    async def nothing(ctx: Context[Counted]) -> None:
        return None

    return bot


async def stored(storage: Storage, key: str) -> StoredSession | Moved | None:
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

    @bot.message()
    async def handler(ctx: Context[Counted]) -> None:
        with pytest.raises(NoSessionKey, match="get_session_key returned None"):
            ctx.session.count += 1
        seen.append("ran")

    assert (
        await pipeline(bot, counting).process(text_update(1, chat_id=7, text="+"))
    ).status is Status.APPLIED
    assert seen == ["ran"]
    assert counting.ops == {}


async def test_each_session_mistake_has_its_own_error_and_none_is_an_attribute_error(
    storage: Storage,
) -> None:
    bot: Bot[Counted] = Bot(
        session(Counted, lazy=True),
        sessions={"keyless": session(Counted, get_session_key=lambda update: None, prefix="k")},
    )
    raised: dict[str, type[Exception]] = {}

    @bot.message()
    async def handler(ctx: Context[Counted]) -> None:
        for name, use in {
            "lazy, not loaded": lambda: ctx.session,
            "getattr on a lazy one": lambda: getattr(ctx, "session", None),
            "no key": lambda: ctx.fragment("keyless"),
            "no such name": lambda: ctx.fragment("nope"),
        }.items():
            with pytest.raises(SessionError) as caught:
                use()
            assert not isinstance(caught.value, AttributeError)
            raised[name] = caught.type

    await pipeline(bot, storage).process(text_update(1, chat_id=7, text="x"))
    assert raised == {
        "lazy, not loaded": SessionNotLoaded,
        "getattr on a lazy one": SessionNotLoaded,
        "no key": NoSessionKey,
        "no such name": NoSuchSession,
    }


async def test_initial_builds_a_fresh_object_per_chat(counting: CountingStorage) -> None:
    bot: Bot[Counted] = Bot(session(Counted))

    @bot.message()
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


async def test_assigning_a_lazy_session_before_loading_it_fails_and_writes_nothing(
    counting: CountingStorage,
) -> None:
    bot = counter_bot(lazy=True)

    @bot.message(text(equals="blind"))
    async def blind(ctx: Context[Counted]) -> None:
        ctx.session = Counted(5)

    run = pipeline(bot, counting)
    await run.process(text_update(1, chat_id=7, text="+"))
    counting.ops.clear()
    assert (await run.process(text_update(2, chat_id=7, text="blind"))).status is Status.DEAD_LETTER
    assert counting.ops == {("claim", "2"): 1, ("dead letter", "2"): 1}  # nothing read or written
    assert await count_of(counting.inner, "7") == 1


async def test_a_lazy_session_loaded_then_reset_to_initial_or_set_to_none_is_written(
    counting: CountingStorage,
) -> None:
    bot = counter_bot(lazy=True)

    @bot.message(text(equals="reset"))
    async def reset(ctx: Context[Counted]) -> None:
        await ctx.get_session()
        ctx.session = Counted()

    run = pipeline(bot, counting)
    await run.process(text_update(1, chat_id=7, text="+"))
    await run.process(text_update(2, chat_id=7, text="reset"))
    saved = await stored(counting.inner, "7")
    assert saved is not None and json.loads(saved.data)["count"] == 0  # not mistaken for "new, untouched"
    await run.process(text_update(3, chat_id=7, text="forget"))
    assert counting.ops["delete", "7"] == 1
    assert await stored(counting.inner, "7") is None


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

    @bot.message()
    async def look(ctx: Context[PizzaV2]) -> None:
        ctx.reply(str(ctx.session.pizza.count))

    result = await pipeline(bot, counting).process(text_update(1, chat_id=7, text="look"))
    assert [c.params["text"] for c in result.to_send] == ["3"]
    saved = await stored(counting.inner, "7")
    assert saved is not None
    assert saved.version == 2
    assert json.loads(saved.data)["pizza"]["count"] == 3  # the new shape


def pizza_v2_bot() -> Bot[PizzaV2]:
    bot: Bot[PizzaV2] = Bot(
        session(PizzaV2, version=2, migrations={1: lambda old: {"pizza": {"count": old["pizza_count"]}}})
    )

    @bot.message()
    async def eat(ctx: Context[PizzaV2]) -> None:
        ctx.session.pizza.count += 1

    return bot


async def test_a_version_with_no_migration_step_fails_naming_the_key_and_the_step(
    counting: CountingStorage, caplog: pytest.LogCaptureFixture
) -> None:
    async with counting.inner.transaction() as tx:
        await tx.write("7", StoredSession('{"pizzaCount": 3}', version=0))
    result = await pipeline(pizza_v2_bot(), counting).process(text_update(1, chat_id=7, text="🍕"))
    assert result.status is Status.DEAD_LETTER
    assert (
        "session 'session', key '7' is version 0, and no migration upgrades version 0 (known: [1])"
        in caplog.text
    )
    assert counting.count("write") == 0


async def test_a_session_written_by_a_newer_version_is_refused_not_downgraded(
    counting: CountingStorage, caplog: pytest.LogCaptureFixture
) -> None:
    # Version 3 added a field this code does not know; decoding would drop it and the write-back would
    # make the loss permanent (a rolled-back deploy reading the new deploy's rows).
    newer = '{"pizza": {"count": 3, "last_at": null}, "favourite": "margherita"}'
    async with counting.inner.transaction() as tx:
        await tx.write("7", StoredSession(newer, version=3))
    result = await pipeline(pizza_v2_bot(), counting).process(text_update(1, chat_id=7, text="🍕"))
    assert result.status is Status.DEAD_LETTER
    assert "session 'session', key '7' is version 3, newer than this code's version 2" in caplog.text
    saved = await stored(counting.inner, "7")
    assert saved is not None and saved.version == 3 and json.loads(saved.data)["favourite"] == "margherita"


async def test_a_stored_row_that_no_longer_decodes_fails_the_update_naming_session_key_and_field(
    counting: CountingStorage, caplog: pytest.LogCaptureFixture
) -> None:
    async with counting.inner.transaction() as tx:
        await tx.write("7", StoredSession('{"count": "many"}'))
    result = await pipeline(counter_bot(), counting).process(text_update(1, chat_id=7, text="+"))
    assert result.status is Status.DEAD_LETTER
    assert (
        "SessionDecodeError: session 'session', key '7': the stored row (version 0) no longer decodes as "
        "Counted, field `$.count`: Expected `int`, got `str`" in caplog.text
    )
    saved = await stored(counting.inner, "7")
    assert saved is not None and json.loads(saved.data) == {"count": "many"}  # untouched, not overwritten


def typed_bot() -> Bot[Counted]:
    bot = counter_bot()

    @bot.message(text(equals="seven"))
    async def seven(ctx: Context[Counted]) -> None:
        (await ctx.get_session()).count = "seven"  # type: ignore[assignment]

    @bot.message(text(equals="object"))
    async def an_object(ctx: Context[Counted]) -> None:
        (await ctx.get_session()).tags.append(object())  # type: ignore[arg-type]

    @bot.message(text(equals="itself"))
    async def itself(ctx: Context[Counted]) -> None:
        tags: list[Any] = (await ctx.get_session()).tags
        tags.append(tags)

    return bot


@pytest.mark.parametrize(
    ("action", "error"),
    [
        ("seven", "the value does not fit Counted, field `$.count`: Expected `int`, got `str`"),
        (
            "object",
            "the value cannot be stored, field `$.tags[0]`: Encoding objects of type object is unsupported",
        ),
        ("itself", "the value cannot be stored, field `$.tags[0]`: the value contains itself"),
    ],
)
async def test_a_session_value_that_does_not_fit_or_cannot_be_stored_fails_the_update_that_sets_it(
    storage_mode: tuple[Storage, bool], caplog: pytest.LogCaptureFixture, action: str, error: str
) -> None:
    """Before, the wrong-typed value was saved and every later update of the chat failed to read it; the
    unstorable one failed with msgspec's bare TypeError, naming neither the session nor the field."""
    storage, optimistic = storage_mode
    run = pipeline(typed_bot(), storage, optimistic=optimistic)
    await run.process(text_update(1, chat_id=7, text="+"))
    failed = await run.process(text_update(2, chat_id=7, text=action))
    assert failed.status is Status.DEAD_LETTER
    assert f"SessionValueError: session 'session', key '7': {error}. Nothing was saved" in caplog.text
    saved = await stored(storage, "7")
    assert saved is not None and json.loads(saved.data) == {"count": 1, "tags": []}  # the last good value
    await run.process(text_update(3, chat_id=7, text="+"))
    look = await run.process(text_update(4, chat_id=7, text="look"))
    assert [c.params["text"] for c in look.to_send] == ["2"]


@dataclass
class Ratio:
    ratio: float | None = None
    seen: list[Any] = field(default_factory=list)


@pytest.mark.parametrize(
    ("said", "at"), [("ratio nan", "$.ratio"), ("ratio inf", "$.ratio"), ("seen -inf", "$.seen[0]")]
)
@pytest.mark.parametrize("new", [False, True], ids=["stored session", "new session"])
async def test_a_float_json_cannot_hold_fails_the_update_even_where_null_would_fit(
    storage_mode: tuple[Storage, bool], caplog: pytest.LogCaptureFixture, said: str, at: str, new: bool
) -> None:
    """JSON has no NaN or infinity: msgspec writes them as null, which an Optional field (or Any) reads
    back as valid. So a ratio of 0/0 was stored as null, silently, where a `float` field failed. In a new
    session whose default is None there, the value encoded as the initial one: taken as unchanged, it was
    not checked, and the update applied."""
    storage, optimistic = storage_mode
    bot: Bot[Ratio] = Bot(session(Ratio))

    @bot.message(text(startswith="ratio "))
    async def ratio(ctx: Context[Ratio]) -> None:
        assert ctx.message is not None and ctx.message.text is not None
        ctx.session.ratio = float(ctx.message.text.removeprefix("ratio "))

    @bot.message(text(startswith="seen "))
    async def seen(ctx: Context[Ratio]) -> None:
        assert ctx.message is not None and ctx.message.text is not None
        ctx.session.seen.append(float(ctx.message.text.removeprefix("seen ")))

    run = pipeline(bot, storage, optimistic=optimistic)
    if not new:
        assert (await run.process(text_update(1, chat_id=7, text="ratio 0.5"))).status is Status.APPLIED
    assert (await run.process(text_update(2, chat_id=7, text=said))).status is Status.DEAD_LETTER
    value = said.split()[1]
    assert (
        f"the value cannot be stored, field `{at}`: {value} is no JSON number. Nothing was saved"
        in caplog.text
    )
    saved = await stored(storage, "7")
    if new:
        assert saved is None
    else:  # the last good value
        assert saved is not None and json.loads(saved.data) == {"ratio": 0.5, "seen": []}


async def test_ttl_expired_session_reads_as_new(counting: CountingStorage) -> None:
    run = pipeline(counter_bot(ttl=0.2), counting)
    await run.process(text_update(1, chat_id=7, text="+"))
    await run.process(text_update(2, chat_id=7, text="+"))
    first = await run.process(text_update(3, chat_id=7, text="look"))
    await asyncio.sleep(0.5)
    second = await run.process(text_update(4, chat_id=7, text="look"))
    assert [c.params["text"] for c in first.to_send + second.to_send] == ["2", "0"]


async def test_concurrent_updates_of_one_chat_lose_no_increment(storage_mode: tuple[Storage, bool]) -> None:
    storage, optimistic = storage_mode
    run = pipeline(counter_bot(), storage, optimistic=optimistic)
    results = await asyncio.gather(*(run.process(text_update(i, chat_id=7, text="+")) for i in range(200)))
    assert {r.status for r in results} == {Status.APPLIED}
    saved = await stored(storage, "7")
    assert saved is not None and json.loads(saved.data)["count"] == 200


async def test_redelivered_update_is_applied_once_and_replies_once(
    storage_mode: tuple[Storage, bool],
) -> None:
    storage, optimistic = storage_mode
    run = pipeline(counter_bot(), storage, optimistic=optimistic)
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
    storage_mode: tuple[Storage, bool], caplog: pytest.LogCaptureFixture
) -> None:
    storage, optimistic = storage_mode
    bot = counter_bot()

    @bot.message(text(equals="boom"))
    async def boom(ctx: Context[Counted]) -> None:
        ctx.session.count += 100
        ctx.reply("never sent")
        raise RuntimeError("handler bug")

    run = pipeline(bot, storage, optimistic=optimistic)
    await run.process(text_update(1, chat_id=7, text="+"))
    failed = await run.process(text_update(2, chat_id=7, text="boom"))
    assert failed.status is Status.DEAD_LETTER and failed.to_send == []
    assert "update 2 is a dead letter (attempt 1): RuntimeError: handler bug" in caplog.text
    assert run.metrics.count("bot_updates_total", kind="message", outcome="dead_letter") == 1
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
    moved_to = message_update(21, -5, None, chat_type="group", extra={"migrate_to_chat_id": -1005})
    for update in (moved_from, moved_to, moved_from):
        assert (await run.process(decode_update(encode(update)))).status in (Status.APPLIED, Status.DUPLICATE)
    assert await stored(storage, "-5") == Moved("-1005")
    look = await run.process(text_update(30, chat_id=-1005, text="look"))
    assert [c.params["text"] for c in look.to_send] == ["4"]


async def test_chat_migration_racing_with_updates_on_both_ids_loses_nothing(
    storage_mode: tuple[Storage, bool],
) -> None:
    storage, optimistic = storage_mode
    run = pipeline(merging_bot(), storage, optimistic=optimistic)
    old_pizzas = [text_update(i, chat_id=-6, text="+") for i in range(1, 101)]
    new_pizzas = [text_update(i, chat_id=-1006, text="+") for i in range(101, 201)]
    # Telegram sends the old chat's messages in order, ending with migrate_to; the new chat's start with
    # migrate_from. The two chats' queues race each other.
    moved_to = decode_update(
        encode(message_update(300, -6, None, chat_type="group", extra={"migrate_to_chat_id": -1006}))
    )
    moved_from = decode_update(encode(message_update(301, -1006, None, extra={"migrate_from_chat_id": -6})))

    async def old_chat() -> None:
        for update in old_pizzas:
            await run.process(update)
        await run.process(moved_to)

    async def new_chat() -> None:
        await run.process(moved_from)
        await asyncio.gather(*(run.process(u) for u in new_pizzas))

    await asyncio.gather(old_chat(), new_chat())
    assert await stored(storage, "-6") == Moved("-1006")
    look = await run.process(text_update(400, chat_id=-1006, text="look"))
    assert [c.params["text"] for c in look.to_send] == ["200"]


def migration(update_id: int, chat_id: int, chat_type: str, **ids: int) -> Update:
    """A service message announcing a move: migrate_to_chat_id=… or migrate_from_chat_id=…."""
    return decode_update(encode(message_update(update_id, chat_id, None, chat_type=chat_type, extra=ids)))


async def test_a_migration_to_the_same_chat_id_is_ignored_and_doubles_nothing(storage: Storage) -> None:
    # The case: a count of 3 became 6 and then 12.
    run = pipeline(merging_bot(), storage)
    for i in range(3):
        await run.process(text_update(i + 1, chat_id=-2001, text="+"))
    to_itself = migration(10, -2001, "group", migrate_to_chat_id=-2001)
    from_itself = migration(11, -2001, "supergroup", migrate_from_chat_id=-2001)
    assert (await run.process(to_itself)).status is Status.IGNORED
    assert (await run.process(from_itself)).status is Status.IGNORED
    look = await run.process(text_update(12, chat_id=-2001, text="look"))
    assert [c.params["text"] for c in look.to_send] == ["3"]


@pytest.mark.parametrize(
    ("chat_id", "chat_type", "ids"),
    [
        (-1_000_000_002_002, "supergroup", {"migrate_from_chat_id": 555}),  # a private chat as the source
        (-1_000_000_002_002, "supergroup", {"migrate_from_chat_id": -1_000_000_000_777}),  # a channel
        (-1_000_000_002_002, "channel", {"migrate_from_chat_id": -2002}),  # only a supergroup comes from one
        (555, "private", {"migrate_to_chat_id": -1_000_000_002_002}),  # only a group is upgraded
        (-1_000_000_000_777, "supergroup", {"migrate_to_chat_id": -1_000_000_002_002}),
    ],
)
async def test_a_migration_whose_source_is_not_a_group_moves_nothing(
    storage: Storage, chat_id: int, chat_type: str, ids: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    run = pipeline(merging_bot(), storage)
    for n, source in enumerate((555, -1_000_000_000_777)):
        await run.process(text_update(n + 1, chat_id=source, text="+"))
    assert (await run.process(migration(10, chat_id, chat_type, **ids))).status is Status.IGNORED
    assert "chat migration ignored" in caplog.text
    for n, chat in enumerate((555, -1_000_000_000_777, -1_000_000_002_002)):
        look = await run.process(text_update(20 + n, chat_id=chat, text="look"))
        assert [c.params["text"] for c in look.to_send] == ["0" if chat == -1_000_000_002_002 else "1"]


async def test_a_late_update_for_the_old_chat_id_lands_in_the_new_chat(storage: Storage) -> None:
    # The case: 3 in group O, both migration messages, then a late 🍕 for O (the redelivery of
    # an earlier 503): the new chat said 3, and O kept a 1 nobody would ever see.
    run = pipeline(merging_bot(), storage)
    old, new = -3001, -1_000_000_003_001
    for i in range(3):
        await run.process(text_update(i + 1, chat_id=old, text="+", chat_type="group"))
    await run.process(migration(10, old, "group", migrate_to_chat_id=new))
    await run.process(migration(11, new, "supergroup", migrate_from_chat_id=old))
    late = await run.process(text_update(4, chat_id=old, text="+", chat_type="group"))
    assert late.status is Status.APPLIED
    look = await run.process(text_update(12, chat_id=new, text="look"))
    assert [c.params["text"] for c in look.to_send] == ["4"]
    assert await stored(storage, str(old)) == Moved(str(new))  # no count of its own for the old id


def multi_bot(user_storage: Storage | None = None) -> Bot[Any]:
    bot: Bot[Any] = Bot(
        sessions={
            "chat": session(Counted),
            "user": session(Counted, get_session_key=user_key, prefix="user:", storage=user_storage),
        }
    )

    @bot.message(text(equals="+"))
    async def plus(ctx: Context[Any]) -> None:
        ctx.fragment("chat").count += 1
        ctx.fragment("user").count += 1

    @bot.message(text(equals="boom"))
    async def boom(ctx: Context[Any]) -> None:
        ctx.fragment("chat").count += 1
        ctx.fragment("user").count += 1
        raise RuntimeError("handler bug")

    return bot


def from_user(update_id: int, chat_id: int, user_id: int, text: str) -> Update:
    raw = message_update(update_id, chat_id, text).json()
    raw["message"]["from"]["id"] = user_id
    return decode_update(encode(raw))


async def count_of(storage: Storage, key: str) -> int:
    saved = await stored(storage, key)
    return 0 if saved is None else int(json.loads(saved.data)["count"])


@pytest.mark.parametrize("user_storage", ["shared", "own"])
async def test_multi_sessions_keep_per_chat_and_per_user_counts_exact_under_concurrency(
    storage_mode: tuple[Storage, bool], user_storage: str
) -> None:
    storage, optimistic = storage_mode
    # "own": the chats in a MemoryStorage, the users in the storage under test, each with its transaction.
    chats, users = (storage, storage) if user_storage == "shared" else (MemoryStorage(), storage)
    run = pipeline(
        multi_bot(user_storage=users if users is not chats else None), chats, optimistic=optimistic
    )
    rng = random.Random(3)
    # Five users writing in five chats at once: every update locks a chat row and a user row, in one
    # global order, so no two updates can deadlock on each other's rows.
    updates = [(i, -(1 + rng.randrange(5)), 100 + rng.randrange(5)) for i in range(1, 301)]
    results = await asyncio.gather(*(run.process(from_user(i, c, u, "+")) for i, c, u in updates))
    assert {r.status for r in results} == {Status.APPLIED}
    for chat in range(1, 6):
        assert await count_of(chats, str(-chat)) == sum(1 for _, c, _ in updates if c == -chat)
    for user in range(100, 105):
        assert await count_of(users, f"user:{user}") == sum(1 for _, _, u in updates if u == user)


async def test_a_session_in_its_own_storage_is_written_there_and_rolled_back_with_the_rest(
    storage: Storage,
) -> None:
    elsewhere = MemoryStorage()
    run = pipeline(multi_bot(user_storage=elsewhere), storage)
    await run.process(from_user(1, -1, 100, "+"))
    await run.process(from_user(2, -1, 100, "+"))
    assert (await count_of(storage, "-1"), await count_of(elsewhere, "user:100")) == (2, 2)
    assert await stored(storage, "user:100") is None
    assert (await run.process(from_user(3, -1, 100, "boom"))).status is Status.DEAD_LETTER
    assert (await count_of(storage, "-1"), await count_of(elsewhere, "user:100")) == (2, 2)
    # The exactly-once record lives in the bot's storage: a redelivery changes neither storage.
    assert (await run.process(from_user(2, -1, 100, "+"))).status is Status.DUPLICATE
    assert (await count_of(storage, "-1"), await count_of(elsewhere, "user:100")) == (2, 2)


async def test_lazy_fragments_are_loaded_only_when_touched(counting: CountingStorage) -> None:
    bot: Bot[Any] = Bot(
        sessions={
            "chat": session(Counted, lazy=True),
            "user": session(Counted, get_session_key=user_key, prefix="user:", lazy=True),
        }
    )

    @bot.message()
    async def only_user(ctx: Context[Any]) -> None:
        (await ctx.get_session("user")).count += 1

    await pipeline(bot, counting).process(from_user(1, -1, 100, "x"))
    assert counting.ops == {("claim", "1"): 1, ("read", "user:100"): 1, ("write", "user:100"): 1}


class MainCommitFails:
    """The bot's storage, failing at its commit once, as if the process died right before it."""

    def __init__(self) -> None:
        self.inner = MemoryStorage()
        self.fail_next_commit = True

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self.inner.transaction() as tx:
            yield tx
            if self.fail_next_commit:
                self.fail_next_commit = False
                raise StorageUnavailable("connection lost at commit")  # rolls the inner transaction back

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_session_in_its_own_storage_commits_first_so_a_crash_between_commits_applies_it_twice(
    storage: Storage,
) -> None:
    main = MainCommitFails()
    run = pipeline(multi_bot(user_storage=storage), main)
    with pytest.raises(TryLater, match="connection lost at commit"):
        await run.process(from_user(1, -1, 100, "+"))
    # The other storage committed; the bot's did not, so the update is not recorded as applied...
    assert (await count_of(main.inner, "-1"), await count_of(storage, "user:100")) == (0, 1)
    # ...and Telegram's redelivery applies it again: exactly once in the bot's storage, twice in the other.
    assert (await run.process(from_user(1, -1, 100, "+"))).status is Status.APPLIED
    assert (await count_of(main.inner, "-1"), await count_of(storage, "user:100")) == (1, 2)


async def test_eager_sessions_are_locked_in_one_global_order_whatever_their_declared_order(
    storage: Storage,
) -> None:
    log: list[tuple[str, str]] = []
    main, other = CountingStorage(storage, log), CountingStorage(MemoryStorage(), log)
    bot: Bot[Any] = Bot(
        sessions={
            "elsewhere": session(Counted, prefix="e:", storage=other),
            "user": session(Counted, get_session_key=user_key, prefix="user:"),
            "chat": session(Counted),
        }
    )

    @bot.message()
    async def nothing(ctx: Context[Any]) -> None:
        return None

    await pipeline(bot, main).process(from_user(1, -1, 100, "x"))
    # The claim, then the bot's storage key by key, then the other storages in the order declared.
    assert log == [("claim", "1"), ("read", "-1"), ("read", "user:100"), ("read", "e:-1")]


async def test_named_sessions_can_be_replaced_and_deleted(storage: Storage) -> None:
    bot = multi_bot()

    @bot.message(text(equals="reset me"))
    async def reset_me(ctx: Context[Any]) -> None:
        ctx.set_fragment("user", Counted(10))

    @bot.message(text(equals="forget me"))
    async def forget_me(ctx: Context[Any]) -> None:
        ctx.set_fragment("user", None)

    run = pipeline(bot, storage)
    await run.process(from_user(1, -1, 100, "+"))
    await run.process(from_user(2, -1, 100, "reset me"))
    assert (await count_of(storage, "-1"), await count_of(storage, "user:100")) == (1, 10)
    await run.process(from_user(3, -1, 100, "forget me"))
    assert await stored(storage, "user:100") is None
    assert await count_of(storage, "-1") == 1


async def test_in_a_private_chat_a_chat_session_and_a_prefixed_user_session_are_two_rows(
    storage: Storage,
) -> None:
    """The chat's id is the user's id there: without the prefix (refused when the bot is built, see
    tests/test_dispatch.py) both sessions were one row and overwrote each other."""
    run = pipeline(multi_bot(), storage)
    await run.process(from_user(1, 100, 100, "+"))  # the private chat of user 100
    await run.process(from_user(2, -1, 100, "+"))  # the same user in a group
    assert (await count_of(storage, "100"), await count_of(storage, "user:100")) == (1, 2)
    assert await count_of(storage, "-1") == 1


class PruneSpy:
    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.pruned: list[int] = []
        self.done = asyncio.Event()

    async def prune(self, keep_updates: float, keep_sent: float) -> int:
        removed = await self.inner.prune(keep_updates, keep_sent)
        self.pruned.append(removed)
        self.done.set()
        return removed

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_the_background_sweeper_deletes_expired_sessions(storage: Storage) -> None:
    run = pipeline(counter_bot(ttl=0.05), storage)
    await run.process(text_update(1, chat_id=7, text="+"))
    await asyncio.sleep(0.1)
    spy = PruneSpy(storage)
    sweeper = asyncio.create_task(Outbox(spy, None, Metrics()).run_sweeper(interval=0.01))
    try:
        await asyncio.wait_for(spy.done.wait(), 5)
    finally:
        sweeper.cancel()
    assert spy.pruned == [1]
    assert await storage.prune(3600, 3600) == 0  # the row is gone, not just reading as expired
