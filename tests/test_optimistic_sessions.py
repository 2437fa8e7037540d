"""Several sessions in one optimistic update (a chat's and a user's, as examples/todo.py has): read or
remembered each, written in one statement that checks them all, and the framework's conflicts never
seen by the bot's own code."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from bot.context import BotIdentity, Context
from bot.dispatch import Bot
from bot.filters import text
from bot.metrics import Metrics
from bot.pipeline import Pipeline, Status
from bot.session import session, user_key
from bot.storage import Conflict, StaleRead, StoredSession
from bot.storage.postgres import PostgresStorage
from bot.testing.updates import text_update

pytestmark = pytest.mark.anyio

ME = BotIdentity(1, "pizza_bot")
CHAT, USER = 7, 5
CHAT_KEY, USER_KEY = "7", "user:5"


@dataclass
class Count:
    count: int = 0


def two_session_bot(
    runs: list[int],
    *,
    between: Callable[[], Awaitable[None]] | None = None,
    before_me: Callable[[], Awaitable[None]] | None = None,
    me_ttl: float | None = None,
) -> Bot[Count]:
    """A chat session, and a lazy per-user one loaded by the handler (examples/todo.py's shape); "c"
    counts in the chat's only, and "?" too, after reading the user's (a setting, say) without changing
    it. `runs` gets the update id of every run of a handler; `before_me` runs before the user's session
    is loaded, `between` after every session the handler uses is; `me_ttl` is the user's session's
    ttl."""
    me = session(Count, get_session_key=user_key, prefix="user:", lazy=True, ttl=me_ttl)
    bot: Bot[Count] = Bot(session(Count), sessions={"me": me})

    @bot.message(text(equals="+"))
    async def plus(ctx: Context[Count]) -> None:
        runs.append(ctx.update.update_id)
        ctx.session.count += 1
        if before_me is not None:
            await before_me()
        (await ctx.get_session("me")).count += 1
        if between is not None:
            await between()

    @bot.message(text(equals="c"))
    async def chat_only(ctx: Context[Count]) -> None:
        runs.append(ctx.update.update_id)
        ctx.session.count += 1
        if between is not None:
            await between()

    @bot.message(text(equals="?"))
    async def looks(ctx: Context[Count]) -> None:
        runs.append(ctx.update.update_id)
        await ctx.get_session("me")
        ctx.session.count += 1

    return bot


def plus(update_id: int, user: int = USER, says: str = "+") -> Any:
    return text_update(update_id, chat_id=CHAT, text=says, from_id=user)


@pytest.fixture
async def logged_with_args(
    direct_or_pooled_url: str,
) -> AsyncIterator[tuple[PostgresStorage, list[str], list[Any]]]:
    """A storage on one connection, every statement sent on it (each a round trip), and their arguments."""
    sent: list[str] = []
    args: list[Any] = []
    storage = await PostgresStorage.connect(direct_or_pooled_url, min_size=1, max_size=1)
    async with storage.pool.acquire() as conn:  # the only connection: it stays logged
        conn.add_query_logger(lambda q: (sent.append(q.query), args.append(q.args)))
    try:
        yield storage, sent, args
    finally:
        await storage.close()


@pytest.fixture
def logged(
    logged_with_args: tuple[PostgresStorage, list[str], list[Any]],
) -> tuple[PostgresStorage, list[str]]:
    """A storage on one connection, and every statement sent on it (each a round trip)."""
    storage, sent, _ = logged_with_args
    return storage, sent


def keys_read(args: Sequence[Any]) -> list[str]:
    """The keys a read asked for: its text parameters (the others are NULLs, or the claimed update's ids)."""
    return [arg for arg in args if isinstance(arg, str)]


async def count_of(storage: PostgresStorage, key: str) -> int | None:
    value = await storage.pool.fetchval("SELECT (data->>'count')::int FROM sessions WHERE key = $1", key)
    return None if value is None else int(value)


def writes_user_during_first_run(other: PostgresStorage, runs: list[int]) -> Callable[[], Awaitable[None]]:
    """Another process (`other`) sets the user's count to 10 while the first run of the handler is under
    way, and never again."""

    async def meanwhile() -> None:
        if len(runs) == 1:
            await write_count(other, USER_KEY, 10)

    return meanwhile


async def write_count(storage: PostgresStorage, key: str, count: int) -> None:
    """Another process's update of the key (with locks)."""
    async with storage.transaction() as tx:
        await tx.read(key)
        await tx.write(key, StoredSession(f'{{"count": {count}}}'))


async def test_an_update_with_two_sessions_runs_once_in_the_round_trips_of_one_session(
    logged: tuple[PostgresStorage, list[str]],
) -> None:
    """A new chat and user: both rows read in one round trip (the user's read ahead with the chat's, though
    its session is lazy), then the one statement. Both remembered afterwards: the one statement alone,
    as for a bot with one session. The handler runs once per update, and no update takes the locking
    transaction (no BEGIN)."""
    storage, sent = logged
    runs: list[int] = []
    run = Pipeline(two_session_bot(runs), storage, ME, Metrics(), optimistic=True)
    trips = []
    for update_id in (1, 2, 3):
        sent.clear()
        assert (await run.process(plus(update_id))).status is Status.APPLIED
        trips.append(len(sent))
        assert not any("BEGIN" in q for q in sent), sent
    assert trips == [2, 1, 1]
    assert runs == [1, 2, 3]
    assert run.metrics.count("bot_optimistic_conflicts_total") == 0
    assert (await count_of(storage, CHAT_KEY), await count_of(storage, USER_KEY)) == (3, 3)


@pytest.mark.parametrize("first", ["?", "c"], ids=["read-and-unchanged", "read-ahead-only"])
async def test_a_user_session_with_no_row_is_remembered_and_costs_no_round_trip_after(
    logged: tuple[PostgresStorage, list[str]], first: str
) -> None:
    """A new user's lazy session, read (with the chat's, in one round trip) and left at its initial
    value, or only read ahead, so never written: its row does not exist, and that is remembered like a
    row read. The user's next updates that use it take the one statement alone, as a bot with one
    session does, which checks that there is still no row; and "+" then writes it."""
    storage, sent = logged
    runs: list[int] = []
    run = Pipeline(two_session_bot(runs), storage, ME, Metrics(), optimistic=True)
    trips = []
    for update_id, says in enumerate([first, "?", "?", "+"], start=1):
        sent.clear()
        assert (await run.process(plus(update_id, says=says))).status is Status.APPLIED
        trips.append(len(sent))
    assert trips == [2, 1, 1, 1]
    assert runs == [1, 2, 3, 4]
    assert run.metrics.count("bot_optimistic_conflicts_total") == 0
    assert (await count_of(storage, CHAT_KEY), await count_of(storage, USER_KEY)) == (4, 1)


async def test_a_row_created_elsewhere_for_a_key_remembered_as_none_is_caught_and_counts_once(
    logged: tuple[PostgresStorage, list[str]], database_url: str
) -> None:
    """The user's session is remembered as no row; another process then writes it (count 10). The next
    update's statement finds the row (no longer "no row"), applies nothing and answers with it, and the
    update runs again from it, once, without locks: the user's count 11, nothing lost."""
    storage, sent = logged
    other = await PostgresStorage.connect(database_url)
    try:
        runs: list[int] = []
        run = Pipeline(two_session_bot(runs), storage, ME, Metrics(), optimistic=True)
        assert (await run.process(plus(1, says="?"))).status is Status.APPLIED
        await write_count(other, USER_KEY, 10)
        sent.clear()
        assert (await run.process(plus(2))).status is Status.APPLIED
        assert len(sent) == 2 and not any("BEGIN" in q for q in sent), sent  # refused, then applied
        assert runs == [1, 2, 2]
        assert (await count_of(storage, CHAT_KEY), await count_of(storage, USER_KEY)) == (2, 11)
        assert await storage.pool.fetchval("SELECT count(*) FROM processed_updates") == 2
        assert not storage.contended(USER_KEY)
    finally:
        await other.close()


async def test_the_read_takes_each_row_by_its_key_in_the_plan_the_server_keeps_for_it(
    logged_with_args: tuple[PostgresStorage, list[str], list[Any]], database_url: str
) -> None:
    """A new chat's read (its user's row read ahead with it), run as a prepared statement is: after five
    runs the server keeps one generic plan, for any keys, rather than planning every run. That plan takes
    each row by its key in the index, whether the table was never analyzed (a new deployment: an
    array of keys made it a hash join over every row, each read reading every session) or holds
    thousands of rows (then the array's plan was worse than a custom one, and every read was planned
    again)."""
    storage, sent, args = logged_with_args
    run = Pipeline(two_session_bot([]), storage, ME, Metrics(), optimistic=True)
    assert (await run.process(plus(1))).status is Status.APPLIED
    read = next(n for n, query in enumerate(sent) if " AS done" in query)
    assert keys_read(args[read]) == [CHAT_KEY, USER_KEY]

    def literal(arg: Any) -> str:
        if arg is None:
            return "NULL"
        return f"'{arg}'" if isinstance(arg, str) else str(arg)

    def sessions_scans(plan: dict[str, Any]) -> list[str]:
        found = [plan["Node Type"]] if plan.get("Relation Name") == "sessions" else []
        return found + [scan for child in plan.get("Plans", ()) for scan in sessions_scans(child)]

    execute = f"EXECUTE read ({', '.join(map(literal, args[read]))})"
    conn = await asyncpg.connect(database_url)
    try:
        for rows in (0, 3000):
            if rows:
                await conn.execute(
                    "INSERT INTO sessions (key, data) SELECT 'other:' || n, '{}' FROM generate_series(1, $1) n",
                    rows,
                )
                await conn.execute("ANALYZE sessions")
            await conn.execute(f"PREPARE read AS {sent[read]}")
            for _ in range(6):
                assert len(await conn.fetch(execute)) == 2
            plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {execute}"))[0]["Plan"]
            generic = await conn.fetchval(
                "SELECT generic_plans FROM pg_prepared_statements WHERE name = 'read'"
            )
            assert generic > 0, f"{rows} other rows: planned again on every run"
            assert sessions_scans(plan) and set(sessions_scans(plan)) == {"Index Scan"}, (rows, plan)
            await conn.execute("DEALLOCATE read")
    finally:
        await conn.close()


async def test_reads_of_a_new_chat_and_of_a_second_sender_at_once_take_one_round_trip(
    logged_with_args: tuple[PostgresStorage, list[str], list[Any]],
) -> None:
    """Chat 7 and its user 5 are remembered. At once: user 6's first message in chat 7 (its chat's row
    remembered, its own read in the handler: one key) and chat 8's first (its row and its sender's
    read ahead: two keys). Both reads go in one round trip, whatever the count of keys (a text per
    count split them into two, each alone, each then holding a connection for its statement)."""
    storage, sent, args = logged_with_args
    runs: list[int] = []
    run = Pipeline(two_session_bot(runs), storage, ME, Metrics(), optimistic=True)
    assert (await run.process(plus(1))).status is Status.APPLIED
    del sent[:], args[:]
    second_sender = plus(2, user=6)
    new_chat = text_update(3, chat_id=8, text="+", from_id=9)
    outcomes = await asyncio.gather(run.process(second_sender), run.process(new_chat))
    assert [o.status for o in outcomes] == [Status.APPLIED, Status.APPLIED]
    reads = [batch for query, batch in zip(sent, args, strict=True) if " AS done" in query]
    assert len(reads) == 1, sent
    assert sorted(key for values in reads[0] for key in keys_read(values)) == ["8", "user:6", "user:9"]
    assert runs == [1, 2, 3]
    assert (await count_of(storage, CHAT_KEY), await count_of(storage, "8")) == (2, 1)
    assert (await count_of(storage, "user:6"), await count_of(storage, "user:9")) == (1, 1)


async def test_five_sessions_are_read_in_one_round_trip_of_eight_places_each_answered_once(
    logged_with_args: tuple[PostgresStorage, list[str], list[Any]],
) -> None:
    """A new chat's update with five sessions (the chat's and four of its sender's, lazy): one read of the
    five rows, in the text of the next multiple of four places (eight: the keys, three NULLs, then the
    update's ids), each row answered once (`Batches` splits a batch's rows by that count), then the one
    statement. All five remembered: the next update sends the statement alone."""
    storage, sent, args = logged_with_args
    others = ("a", "b", "c", "d")
    lazy = {name: session(Count, get_session_key=user_key, prefix=f"{name}:", lazy=True) for name in others}
    bot: Bot[Count] = Bot(session(Count), sessions=lazy)

    @bot.message(text(equals="+"))
    async def everyone(ctx: Context[Count]) -> None:
        ctx.session.count += 1
        for name in others:
            (await ctx.get_session(name)).count += 1

    run = Pipeline(bot, storage, ME, Metrics(), optimistic=True)
    keys = [CHAT_KEY, *(f"{name}:{USER}" for name in others)]
    trips = []
    for update_id in (1, 2):
        del sent[:], args[:]
        assert (await run.process(plus(update_id))).status is Status.APPLIED
        trips.append(len(sent))
        if update_id == 1:
            assert " AS done" in sent[0] and "$8::text" in sent[0] and "$9::text" not in sent[0], sent[0]
            assert sorted(keys_read(args[0])) == sorted(keys)
            assert list(args[0])[len(keys) :] == [None, None, None, ME.id, 1]
    assert trips == [2, 1]
    assert run.metrics.count("bot_optimistic_conflicts_total") == 0
    assert [await count_of(storage, key) for key in keys] == [2] * len(keys)


async def test_another_process_writing_the_second_session_refreshes_it_and_the_update_counts_once(
    logged: tuple[PostgresStorage, list[str]], database_url: str
) -> None:
    """Both rows remembered; another process changes the user's meanwhile. The statement is refused with
    the user's current row (the chat's still matches), and the retry from it applies, without locks."""
    storage, sent = logged
    other = await PostgresStorage.connect(database_url)
    try:
        runs: list[int] = []
        run = Pipeline(two_session_bot(runs), storage, ME, Metrics(), optimistic=True)
        await run.process(plus(1))
        await write_count(other, USER_KEY, 10)
        sent.clear()
        assert (await run.process(plus(2))).status is Status.APPLIED
        assert len(sent) == 2 and not any("BEGIN" in q for q in sent), sent
        assert runs == [1, 2, 2]
        assert run.metrics.count("bot_optimistic_conflicts_total") == 1
        assert (await count_of(storage, CHAT_KEY), await count_of(storage, USER_KEY)) == (2, 11)
        assert not storage.contended(USER_KEY)
    finally:
        await other.close()


async def test_a_second_session_written_after_it_was_read_conflicts_and_the_update_counts_once(
    database_url: str,
) -> None:
    """Another process writes the user's row between the read and the statement: the statement checks
    it (not only the chat's row), applies nothing, and the update runs again with locks, once."""
    storage = await PostgresStorage.connect(database_url, cache_size=0)  # every row read afresh
    other = await PostgresStorage.connect(database_url)
    try:
        runs: list[int] = []
        bot = two_session_bot(runs, between=writes_user_during_first_run(other, runs))
        run = Pipeline(bot, storage, ME, Metrics(), optimistic=True)
        assert (await run.process(plus(1))).status is Status.APPLIED
        assert runs == [1, 1]
        assert (await count_of(storage, CHAT_KEY), await count_of(storage, USER_KEY)) == (1, 11)
        assert storage.contended(USER_KEY) and not storage.contended(CHAT_KEY)
        assert await storage.pool.fetchval("SELECT count(*) FROM processed_updates") == 1
    finally:
        await storage.close()
        await other.close()


async def test_a_session_read_ahead_but_never_used_may_change_elsewhere_without_a_conflict(
    logged_with_args: tuple[PostgresStorage, list[str], list[Any]], database_url: str
) -> None:
    """The chat's read also reads the user's row ahead (the update's other session), but the handler
    never asks for it: another process writing that row meanwhile changes nothing for this update, which
    applies at once, checking and writing the chat's row only."""
    storage, sent, args = logged_with_args
    other = await PostgresStorage.connect(database_url)
    try:
        await write_count(other, USER_KEY, 3)
        runs: list[int] = []
        bot = two_session_bot(runs, between=writes_user_during_first_run(other, runs))
        run = Pipeline(bot, storage, ME, Metrics(), optimistic=True)
        assert (await run.process(plus(1, says="c"))).status is Status.APPLIED
        assert len(sent) == 2 and not any("BEGIN" in q for q in sent), sent
        assert keys_read(args[0]) == [CHAT_KEY, USER_KEY]  # read in one round trip
        assert runs == [1]
        assert run.metrics.count("bot_optimistic_conflicts_total") == 0
        assert (await count_of(storage, CHAT_KEY), await count_of(storage, USER_KEY)) == (1, 10)
        assert not storage.contended(USER_KEY)
        # The row read ahead is remembered as read (count 3), as any row read is: the next update that
        # uses it finds it stale at its statement, which answers with the row as it is now, and runs
        # again from that, once, without locks (what a stale memory costs, as for a row read and used).
        remembered = storage.cache.get(USER_KEY)
        assert remembered is not None and remembered.session == StoredSession('{"count": 3}')
        sent.clear()
        assert (await run.process(plus(2))).status is Status.APPLIED
        assert len(sent) == 2 and not any("BEGIN" in q for q in sent), sent  # refused, then applied
        assert (await count_of(storage, CHAT_KEY), await count_of(storage, USER_KEY)) == (2, 11)
        assert runs == [1, 2, 2]
        assert not storage.contended(USER_KEY)
    finally:
        await other.close()


async def test_a_session_read_ahead_then_changed_elsewhere_before_its_use_is_caught_and_counts_once(
    logged_with_args: tuple[PostgresStorage, list[str], list[Any]], database_url: str
) -> None:
    """The user's row is read ahead with the chat's; another process writes it before the handler asks
    for it, so the handler gets the value read ahead, which is stale by then. The statement checks that
    row's version as it would a row read when asked for: it applies nothing, and the update runs again
    with locks, once, from the current row."""
    storage, sent, args = logged_with_args
    other = await PostgresStorage.connect(database_url)
    try:
        runs: list[int] = []
        bot = two_session_bot(runs, before_me=writes_user_during_first_run(other, runs))
        run = Pipeline(bot, storage, ME, Metrics(), optimistic=True)
        assert (await run.process(plus(1))).status is Status.APPLIED
        assert keys_read(args[0]) == [CHAT_KEY, USER_KEY]  # read in one round trip, before the other write
        assert not any("BEGIN" in q for q in sent[:2]) and "BEGIN" in sent[2], sent
        assert runs == [1, 1]
        assert run.metrics.count("bot_optimistic_conflicts_total") == 1
        assert (await count_of(storage, CHAT_KEY), await count_of(storage, USER_KEY)) == (1, 11)
        assert await storage.pool.fetchval("SELECT count(*) FROM processed_updates") == 1
        assert storage.contended(USER_KEY)
    finally:
        await other.close()


async def test_a_session_read_ahead_that_expired_reads_as_missing_when_used(
    logged_with_args: tuple[PostgresStorage, list[str], list[Any]],
) -> None:
    """A row read ahead is answered as a row read when asked for would be: an expired one as no session."""
    storage, sent, args = logged_with_args
    async with storage.transaction() as tx:
        await tx.read(USER_KEY)
        await tx.write(USER_KEY, StoredSession('{"count": 5}'), ttl=0.01)
    await asyncio.sleep(0.05)
    sent.clear()
    args.clear()
    runs: list[int] = []
    run = Pipeline(two_session_bot(runs), storage, ME, Metrics(), optimistic=True)
    assert (await run.process(plus(1))).status is Status.APPLIED
    assert keys_read(args[0]) == [CHAT_KEY, USER_KEY]  # read in one round trip
    assert len(sent) == 2 and not any("BEGIN" in q for q in sent), sent
    assert runs == [1]
    assert (await count_of(storage, CHAT_KEY), await count_of(storage, USER_KEY)) == (1, 1)


@pytest.mark.parametrize(
    ("me_ttl", "cache_size", "read_again"),
    [(None, 5000, False), (3600.0, 5000, True), (None, 0, True)],
    ids=["remembered", "with-a-ttl", "cache-off"],
)
async def test_a_session_read_ahead_then_written_by_this_process_is_not_a_conflict(
    direct_or_pooled_url: str, me_ttl: float | None, cache_size: int, read_again: bool
) -> None:
    """Update 1 (chat 7) reads the user's row ahead with the chat's (no row: remembered as none, unless
    SESSION_CACHE=0); update 2 (chat 8, same user) writes the user's session in this process before
    update 1 asks for it. Update 1 then answers from what this process remembers of update 2's write
    or, when it keeps none (a session with a ttl, or SESSION_CACHE=0), reads the row again: never the
    older row read ahead, which would be a conflict, a second run and the key run with locks for a
    while. Each update applied once, the user's count 2."""
    storage = await PostgresStorage.connect(
        direct_or_pooled_url, min_size=2, max_size=2, cache_size=cache_size
    )
    try:
        reads: list[Any] = []
        connections = [await storage.pool.acquire() for _ in range(2)]
        for conn in connections:
            conn.add_query_logger(
                lambda q: reads.append(keys_read(q.args)) if " AS done" in q.query else None
            )
            await storage.pool.release(conn)
        runs: list[int] = []
        paused, go = asyncio.Event(), asyncio.Event()

        async def until_update_2_is_applied() -> None:
            if runs == [1]:
                paused.set()
                await go.wait()

        bot = two_session_bot(runs, before_me=until_update_2_is_applied, me_ttl=me_ttl)
        run = Pipeline(bot, storage, ME, Metrics(), optimistic=True)
        first = asyncio.create_task(run.process(plus(1)))
        await paused.wait()
        second = text_update(2, chat_id=8, text="+", from_id=USER)
        assert (await run.process(second)).status is Status.APPLIED
        go.set()
        assert (await first).status is Status.APPLIED
        # Update 2 reads the user's row ahead only when update 1's read of it is not remembered.
        second_read = ["8", USER_KEY] if cache_size == 0 else ["8"]
        again = [[USER_KEY]] if read_again else []
        assert reads == [[CHAT_KEY, USER_KEY], second_read, *again]
        assert runs == [1, 2]
        assert run.metrics.count("bot_optimistic_conflicts_total") == 0
        assert not storage.contended(USER_KEY)
        counts = [await count_of(storage, key) for key in (CHAT_KEY, "8", USER_KEY)]
        assert counts == [1, 1, 2]
    finally:
        await storage.close()


async def test_a_middleware_catching_exception_never_sees_a_conflict(
    logged: tuple[PostgresStorage, list[str]],
) -> None:
    """The user's session is contended: loading it in the handler gives way to the locking transaction.
    A middleware with `except Exception` (a timing or error-reporting one) must not catch that: it is
    the framework's control flow, and the update is applied exactly once, with locks."""
    storage, _ = logged
    runs: list[int] = []
    caught: list[BaseException] = []
    bot = two_session_bot(runs)

    @bot.use
    async def reporting(ctx: Context[Count], next: Callable[[], Awaitable[None]]) -> None:
        try:
            await next()
        except Exception as exc:
            caught.append(exc)
            raise

    storage.contend(USER_KEY)
    run = Pipeline(bot, storage, ME, Metrics(), optimistic=True)
    assert (await run.process(plus(1))).status is Status.APPLIED
    assert caught == []
    assert runs == [1, 1]
    assert (await count_of(storage, CHAT_KEY), await count_of(storage, USER_KEY)) == (1, 1)


async def test_a_torn_write_of_the_second_session_rolls_the_whole_statement_back(database_url: str) -> None:
    """Both rows unchanged in the statement's snapshot, so it claims and writes the chat's; the user's
    row is held by another process that then commits a change, so that write finds a newer version.
    Nothing of the statement may stay: not the claim, not the chat's write."""
    storage = await PostgresStorage.connect(database_url)
    try:
        await write_count(storage, CHAT_KEY, 1)
        await write_count(storage, USER_KEY, 1)

        async def attempt() -> None:
            async with storage.optimistic_transaction() as tx:
                await tx.claim_update(1, 40)
                await tx.read(CHAT_KEY)
                await tx.read(USER_KEY)
                await tx.write(CHAT_KEY, StoredSession('{"count": 2}'))
                await tx.write(USER_KEY, StoredSession('{"count": 2}'))

        async with storage.transaction() as locked:
            await locked.read(USER_KEY)  # holds the user's row
            task = asyncio.create_task(attempt())
            await asyncio.sleep(0.3)  # checked both (unchanged), claimed, wrote the chat, waits for the user
            await locked.write(USER_KEY, StoredSession('{"count": 5}'))
        with pytest.raises(Conflict, match="DivisionByZero"):
            await task
        assert await storage.pool.fetchval("SELECT count(*) FROM processed_updates") == 0
        assert (await count_of(storage, CHAT_KEY), await count_of(storage, USER_KEY)) == (1, 5)
    finally:
        await storage.close()


async def test_a_later_key_whose_turn_is_taken_gives_way_instead_of_waiting(database_url: str) -> None:
    """An update holding a key's turn that waited for another key's could wait for an update holding
    that one and wanting the first (the same two keys in the other order), or for the connection this
    one holds: it gives way to the locking transaction at once instead, and gives its turn back."""
    storage = await PostgresStorage.connect(database_url)
    try:
        holding, done = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with storage.optimistic_transaction() as tx:
                await tx.read("a")
                holding.set()
                await done.wait()

        held = asyncio.create_task(holder())
        await holding.wait()

        async def attempt() -> None:
            async with storage.optimistic_transaction() as tx:
                await tx.claim_update(1, 2)
                await tx.read("b")
                await tx.read("a")

        with pytest.raises(Conflict, match="'a' is another update's turn"):
            async with asyncio.timeout(5):
                await attempt()
        assert not storage.turns.busy("b") and storage.turns.busy("a")
        done.set()
        await held
    finally:
        await storage.close()


async def test_two_processes_writing_the_same_two_sessions_lose_and_double_nothing(database_url: str) -> None:
    """Two processes (two storages, each with its memory and turns) get one chat's updates from two
    users at once, each update changing the chat's row and its user's. Every count exact; and, unlike
    a transaction that takes one session only, most updates run their handlers once."""
    storages = [await PostgresStorage.connect(database_url, max_size=4) for _ in range(2)]
    try:
        runs: list[int] = []
        pipelines = [Pipeline(two_session_bot(runs), s, ME, Metrics(), optimistic=True) for s in storages]
        updates = 60
        for start in range(1, updates + 1, 20):  # in waves, so both warm and cold memories race
            await asyncio.gather(
                *(pipelines[n % 2].process(plus(n, user=100 + n % 3)) for n in range(start, start + 20))
            )
        probe = storages[0]
        assert await count_of(probe, CHAT_KEY) == updates
        assert [await count_of(probe, f"user:{100 + u}") for u in range(3)] == [20, 20, 20]
        assert await probe.pool.fetchval("SELECT count(*) FROM processed_updates") == updates
        assert sorted(set(runs)) == list(range(1, updates + 1))
        # A transaction that takes one session only runs each such update twice (then with locks).
        assert len(runs) < 2 * updates
        assert max(runs.count(n) for n in range(1, updates + 1)) <= 3  # stale memory, refresh, lock
    finally:
        for s in storages:
            await s.close()


async def test_a_stale_memory_of_both_sessions_is_a_stale_read(database_url: str) -> None:
    """Both remembered rows changed elsewhere: refreshed together from one refusal (StaleRead), so the
    retry checks both again at no extra round trip."""
    storage = await PostgresStorage.connect(database_url)
    other = await PostgresStorage.connect(database_url)
    try:
        runs: list[int] = []
        run = Pipeline(two_session_bot(runs), storage, ME, Metrics(), optimistic=True)
        await run.process(plus(1))
        await write_count(other, CHAT_KEY, 10)
        await write_count(other, USER_KEY, 20)

        async def attempt() -> None:
            async with storage.optimistic_transaction() as tx:
                await tx.claim_update(1, 2)
                await tx.read(CHAT_KEY)
                await tx.read(USER_KEY)
                await tx.write(CHAT_KEY, StoredSession('{"count": 2}'))

        with pytest.raises(StaleRead, match=f"{CHAT_KEY!r}, {USER_KEY!r}"):
            await attempt()
        chat, user = storage.cache.get(CHAT_KEY), storage.cache.get(USER_KEY)
        assert chat is not None and user is not None
        assert (chat.session, user.session) == (
            StoredSession('{"count": 10}'),
            StoredSession('{"count": 20}'),
        )
    finally:
        await storage.close()
        await other.close()


async def test_a_row_read_ahead_while_a_locking_update_of_this_process_commits_it_is_not_remembered_stale(
    database_url: str,
) -> None:
    """A locking update of this process writes the user's session (count 10); its commit is in flight
    (held here by a lock on another row it writes, as a slow round trip would) when an optimistic
    update of the chat ("c") reads the user's row ahead: it sees the row as it was before that commit
    (none). The locking transaction told the cache it wrote the key before committing, so the read
    ahead is not "older than a write of this process" by the clock, and no turn is held: that stale
    "no row" must not be remembered, else the user's next update runs twice (StaleRead)."""
    storage = await PostgresStorage.connect(database_url, min_size=1, max_size=3)
    blocker = await asyncpg.connect(database_url)
    watcher = await asyncpg.connect(database_url)
    try:
        runs: list[int] = []
        run = Pipeline(two_session_bot(runs), storage, ME, Metrics(), optimistic=True)
        await blocker.execute("INSERT INTO sessions (key, data, version) VALUES ('held', '{}', 1)")
        held = blocker.transaction()
        await held.start()
        await blocker.execute("SELECT FROM sessions WHERE key = 'held' FOR UPDATE")

        async def locking_update() -> None:
            async with storage.transaction() as tx:
                await tx.read(USER_KEY)
                await tx.write(USER_KEY, StoredSession('{"count": 10}'))
                await tx.write("held", StoredSession("{}"))

        committing = asyncio.create_task(locking_update())
        for _ in range(1000):  # until the commit waits for the lock (10 s at most)
            if await watcher.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"):
                break
            await asyncio.sleep(0.01)
        assert not committing.done()
        assert (await run.process(plus(1, says="c"))).status is Status.APPLIED  # reads the user's ahead
        await held.rollback()
        await committing
        assert await count_of(storage, USER_KEY) == 10
        remembered = storage.cache.get(USER_KEY)
        assert remembered is None or remembered.session is not None, remembered  # not "no row"
        assert (await run.process(plus(2))).status is Status.APPLIED
        assert runs == [1, 2]
        assert (await count_of(storage, CHAT_KEY), await count_of(storage, USER_KEY)) == (2, 11)
    finally:
        await watcher.close()
        await blocker.close()
        await storage.close()


async def test_a_row_read_ahead_is_not_used_over_a_newer_one_this_process_remembers(
    database_url: str,
) -> None:
    """Update 1 (chat 7) reads the user's row ahead (count 3) and pauses before using it; another process
    sets the user's count to 10; update 2 (chat 8, same user) only reads the user's session, finds what
    this process remembered stale, and runs again from the row that came back (10), writing nothing of
    the user's. Update 1 must then answer the newer row this process remembers, not its older row read
    ahead: that would be a conflict, a second run with locks, and the user's key contended for a while."""
    storage = await PostgresStorage.connect(database_url, min_size=2, max_size=2)
    other = await PostgresStorage.connect(database_url)
    try:
        await write_count(other, USER_KEY, 3)
        runs: list[int] = []
        paused, go = asyncio.Event(), asyncio.Event()

        async def until_update_2_is_applied() -> None:
            if not paused.is_set():
                paused.set()
                await go.wait()

        run = Pipeline(
            two_session_bot(runs, before_me=until_update_2_is_applied),
            storage,
            ME,
            Metrics(),
            optimistic=True,
        )
        first = asyncio.create_task(run.process(plus(1)))
        await paused.wait()
        await write_count(other, USER_KEY, 10)
        second = text_update(2, chat_id=8, text="?", from_id=USER)
        assert (await run.process(second)).status is Status.APPLIED
        go.set()
        assert (await first).status is Status.APPLIED
        assert runs.count(1) == 1, runs
        assert not storage.contended(USER_KEY)
        counts = [await count_of(storage, key) for key in (CHAT_KEY, "8", USER_KEY)]
        assert counts == [1, 1, 11]
    finally:
        await other.close()
        await storage.close()


async def test_two_processes_taking_turns_on_a_chat_and_its_user_read_both_in_one_round_trip(
    logged: tuple[PostgresStorage, list[str]], direct_or_pooled_url: str
) -> None:
    """Two processes take turns on a chat and its user, as across instances or WEB_CONCURRENCY
    workers: both keys go stale in each process's memory on every update. After each process's first
    refusal both are read afresh, the user's ahead with the chat's: one read and the statement, not a
    second read of a key read ahead because the memory it differs from is stale."""
    first, sent = logged
    second = await PostgresStorage.connect(direct_or_pooled_url, min_size=1, max_size=1)
    try:
        runs: list[int] = []
        pipelines = [
            Pipeline(two_session_bot(runs), storage, ME, Metrics(), optimistic=True)
            for storage in (first, second)
        ]
        trips = []
        for update_id in range(1, 11):
            sent.clear()
            assert (await pipelines[update_id % 2].process(plus(update_id))).status is Status.APPLIED
            if update_id % 2 == 0:  # on `first`
                trips.append(len(sent))
        assert trips[2:] == [2, 2, 2], (trips, sent)  # (before: [3, 3, 3], the user's row read twice)
        # Only each process's first update after the other wrote ran twice.
        assert [pipeline.metrics.count("bot_optimistic_conflicts_total") for pipeline in pipelines] == [1, 1]
        assert (await count_of(first, CHAT_KEY), await count_of(first, USER_KEY)) == (10, 10)
    finally:
        await second.close()
