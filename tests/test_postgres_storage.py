"""What only the PostgreSQL storage has to get right: rows, locks and the pool, seen from SQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from bot.context import BotIdentity, Context
from bot.dispatch import Bot
from bot.embedded import EmbeddedPostgres
from bot.filters import text
from bot.metrics import Metrics
from bot.migrate import migrate
from bot.pipeline import Outcome, Pipeline, Status
from bot.session import session
from bot.storage import (
    Conflict,
    OutgoingCall,
    StaleRead,
    StorageRefused,
    StorageUnavailable,
    StoredSession,
)
from bot.storage.cache import Contended
from bot.storage.postgres import PostgresStorage
from bot.storage.postgres.optimistic_sql import CLAIM, apply_text, revision
from bot.telegram import Update
from bot.testing.pgbouncer import PgBouncer
from bot.testing.updates import text_update

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["direct", "pgbouncer"])
async def postgres(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[PostgresStorage]:
    """The storage straight on PostgreSQL, and through PgBouncer in transaction mode, where the lock
    timeout can only work if it is set inside each transaction."""
    url, pooler = database_url, "none"
    if request.param == "pgbouncer":
        url, pooler = request.getfixturevalue("pooled_database_url"), "transaction"
    storage = await PostgresStorage.connect(url, lock_timeout=0.5, pooler=pooler)
    try:
        yield storage
    finally:
        await storage.close()


async def test_a_session_never_written_leaves_no_row(postgres: PostgresStorage) -> None:
    async with postgres.transaction() as tx:
        assert await tx.read("new-chat") is None  # locked through a placeholder row
    assert await postgres.pool.fetchval("SELECT count(*) FROM sessions") == 0


async def test_several_pending_writes_flushed_by_a_later_read_are_all_stored(
    postgres: PostgresStorage,
) -> None:
    # Writes wait for the next statement; a read after two of them (a lazy session, a third key) sends
    # both at once, with their parameters numbered across the two.
    async with postgres.transaction() as tx:
        await tx.claim_update(1, 1)
        assert await tx.read("a") is None
        assert await tx.read("b") is None
        await tx.write("a", StoredSession('{"n": 1}', 0))
        await tx.delete("b")
        await tx.write("b", StoredSession('{"n": 2}', 3), ttl=60)
        assert await tx.read("c") is None
    rows = await postgres.pool.fetch("SELECT key, data::text, version FROM sessions ORDER BY key")
    assert [tuple(r) for r in rows] == [("a", '{"n": 1}', 0), ("b", '{"n": 2}', 3)]


async def test_updates_that_touch_nothing_take_no_connection(postgres: PostgresStorage) -> None:
    idle_before = postgres.pool.get_idle_size()
    async with postgres.transaction():
        assert postgres.pool.get_idle_size() == idle_before


async def test_prune_skips_an_expired_row_that_is_locked_and_removes_it_later(
    postgres: PostgresStorage,
) -> None:
    async with postgres.transaction() as tx:
        await tx.read("brief")
        await tx.write("brief", StoredSession('{"n": 1}'), ttl=0.01)
    await asyncio.sleep(0.05)
    async with postgres.transaction() as tx:
        assert await tx.read("brief") is None  # expired, and now locked by us
        assert await asyncio.wait_for(postgres.prune(3600, 3600), timeout=2) == 0  # skipped, not waited on
    assert await postgres.prune(3600, 3600) == 1
    assert await postgres.pool.fetchval("SELECT count(*) FROM sessions") == 0


async def test_a_lock_held_past_lock_timeout_is_storage_unavailable(
    postgres: PostgresStorage, database_url: str
) -> None:
    async with postgres.transaction() as tx:
        await tx.read("k")
        await tx.write("k", StoredSession("{}"))
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM sessions WHERE key = 'k' FOR UPDATE")
            with pytest.raises(StorageUnavailable, match="LockNotAvailable"):
                async with postgres.transaction() as tx:
                    await tx.read("k")
    finally:
        await blocker.close()


async def test_an_unreachable_database_is_storage_unavailable() -> None:
    with pytest.raises(StorageUnavailable, match="connect to the database"):
        await PostgresStorage.connect("postgresql://nobody@127.0.0.1:9/none", connect_timeout=1)


async def test_old_update_ids_and_sent_replies_are_pruned(postgres: PostgresStorage) -> None:
    async with postgres.transaction() as tx:
        await tx.claim_update(1, 1)
    await postgres.pool.execute("UPDATE processed_updates SET processed_at = now() - interval '26 hours'")
    async with postgres.transaction() as tx:
        await tx.claim_update(1, 2)
    assert await postgres.prune(keep_updates=25 * 3600, keep_sent=3600) == 1
    assert await postgres.pool.fetchval("SELECT array_agg(update_id) FROM processed_updates") == [2]


# --- Round trips, and the optimistic transaction ------------------------------------------------------


@dataclass
class Counter:
    count: int = 0


def counter_bot() -> Bot[Counter]:
    bot: Bot[Counter] = Bot(session(Counter))

    @bot.message(text(equals="+"))
    async def plus(ctx: Context[Counter]) -> None:
        ctx.session.count += 1

    @bot.message(text(equals="look"))
    async def look(ctx: Context[Counter]) -> None:
        ctx.reply(str(ctx.session.count))

    return bot


@pytest.mark.parametrize(
    ("optimistic", "cache_size", "trips"),
    [(False, 10_000, (3, 4)), (True, 0, (2, 2)), (True, 10_000, (1, 1))],
    ids=["locked", "optimistic, nothing remembered", "optimistic"],
)
async def test_round_trips_per_update_of_a_known_chat(
    database_url: str, optimistic: bool, cache_size: int, trips: tuple[int, int]
) -> None:
    """Each statement sent is a round trip: a 🍕-like update (changes the session, no reply) and a
    /hunger-like one (reads it, queues a reply). Optimistic, a session this process wrote last is
    not read again."""
    sent: list[str] = []

    storage = await PostgresStorage.connect(database_url, min_size=1, max_size=1, cache_size=cache_size)
    async with storage.pool.acquire() as conn:  # the only connection: it stays logged
        conn.add_query_logger(lambda q: sent.append(q.query))
    try:
        run = Pipeline(counter_bot(), storage, BotIdentity(1, "pizza_bot"), Metrics(), optimistic=optimistic)
        await run.process(text_update(1, chat_id=7, text="+"))  # the chat's first update creates its row
        counted = []
        for update_id, text in ((2, "+"), (3, "look")):
            sent.clear()
            outcome = await run.process(text_update(update_id, chat_id=7, text=text))
            assert outcome.status is Status.APPLIED
            counted.append(len(sent))
        assert tuple(counted) == trips, sent
        assert [c.params["text"] for c in outcome.to_send] == ["2"]
        assert run.metrics.count("bot_optimistic_conflicts_total") == 0
    finally:
        await storage.close()


async def test_a_chat_two_processes_take_turns_on_is_read_afresh_after_its_first_stale_memory(
    database_url: str,
) -> None:
    """Two processes (two storages, each remembering what it wrote) take turns on one chat, as a chat's
    updates do across instances or WEB_CONCURRENCY workers. Each process's first update after the
    other wrote finds its memory stale: the statement is refused with the current row, and the retry
    from that row applies (a second run of the handlers). From then on the process reads the chat
    afresh for a while instead of trusting its memory: a read and the statement, the same two round
    trips, no BEGIN, and the handlers run once (each update ran twice before). Every increment counted
    once."""
    sent: list[str] = []
    first = await PostgresStorage.connect(database_url, min_size=1, max_size=1)
    second = await PostgresStorage.connect(database_url, min_size=1, max_size=1)
    async with first.pool.acquire() as conn:
        conn.add_query_logger(lambda q: sent.append(q.query))
    try:
        runs = [
            Pipeline(counter_bot(), s, BotIdentity(1, "pizza_bot"), Metrics(), optimistic=True)
            for s in (first, second)
        ]
        for update_id in range(1, 9):
            sent.clear()
            outcome = await runs[update_id % 2].process(text_update(update_id, chat_id=7, text="+"))
            assert outcome.status is Status.APPLIED
        assert len(sent) == 2 and not any("BEGIN" in q for q in sent), sent  # update 8, on `first`
        assert " AS done" in sent[0], sent  # a read, not a refused statement
        # Only update 3 (on `second`) and update 4 (on `first`) ran twice.
        assert [run.metrics.count("bot_optimistic_conflicts_total") for run in runs] == [1, 1]
        assert await first.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = '7'") == "8"
        assert not first.contended("7")
    finally:
        await first.close()
        await second.close()


async def test_a_redelivery_is_told_apart_when_the_session_is_remembered(postgres: PostgresStorage) -> None:
    run = Pipeline(counter_bot(), postgres, BotIdentity(1, "pizza_bot"), Metrics(), optimistic=True)
    for update_id in (1, 2):
        await run.process(text_update(update_id, chat_id=7, text="+"))
    assert postgres.cache.get("7") is not None
    # Another pipeline on the same storage knows nothing of update 2: the claim in its statement does.
    restarted = Pipeline(counter_bot(), postgres, BotIdentity(1, "pizza_bot"), Metrics(), optimistic=True)
    assert (await restarted.process(text_update(2, chat_id=7, text="+"))).status is Status.DUPLICATE
    assert await postgres.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = '7'") == "2"


async def test_a_session_written_with_locks_is_forgotten(postgres: PostgresStorage) -> None:
    run = Pipeline(counter_bot(), postgres, BotIdentity(1, "pizza_bot"), Metrics(), optimistic=True)
    await run.process(text_update(1, chat_id=7, text="+"))
    assert postgres.cache.get("7") is not None
    await _write_count(postgres, "7", 40)
    assert postgres.cache.get("7") is None
    await run.process(text_update(2, chat_id=7, text="+"))
    assert await postgres.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = '7'") == "41"
    assert run.metrics.count("bot_optimistic_conflicts_total") == 0


async def test_updates_of_one_chat_in_one_process_take_turns_instead_of_conflicting(
    postgres: PostgresStorage,
) -> None:
    run = Pipeline(counter_bot(), postgres, BotIdentity(1, "pizza_bot"), Metrics(), optimistic=True)
    outcomes = await asyncio.gather(*(run.process(text_update(n, chat_id=7, text="+")) for n in range(1, 33)))
    assert {o.status for o in outcomes} == {Status.APPLIED}
    assert await postgres.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = '7'") == "32"
    assert run.metrics.count("bot_optimistic_conflicts_total") == 0


async def test_a_key_read_twice_in_one_transaction_does_not_wait_for_itself(
    postgres: PostgresStorage,
) -> None:
    """The transaction takes the key's turn once for both reads, not waiting behind itself until the
    deadline, and gives it back at the end for the next update. (Two sessions of one bot never share a
    key: `Bot` refuses them; the storage keeps its promise to any caller.)"""

    async def attempt(update_id: int) -> None:
        async with postgres.optimistic_transaction() as tx:
            await tx.claim_update(1, update_id)
            await tx.read("7")
            await tx.read("7")
            await tx.write("7", StoredSession(f'{{"count": {update_id}}}'))

    for update_id in (1, 2):
        await asyncio.wait_for(attempt(update_id), 10)
    assert await postgres.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = '7'") == "2"


async def test_a_conflict_is_not_handed_to_the_error_hook_and_the_update_still_applies(
    postgres: PostgresStorage,
) -> None:
    """The optimistic attempt gives way (here: a chat marked contended) inside the handlers' try: that
    is the storage's business, not a handler error, and the update must run with locks, not be
    acknowledged as failed with its id claimed and its effects missing."""
    bot = counter_bot()
    seen: list[Exception] = []

    @bot.catch
    async def on_error(error: Exception, ctx: Context[Counter]) -> None:
        seen.append(error)

    postgres.contend("7")
    run = Pipeline(bot, postgres, BotIdentity(1, "pizza_bot"), Metrics(), optimistic=True)
    assert (await run.process(text_update(1, chat_id=7, text="+"))).status is Status.APPLIED
    assert seen == []
    assert await postgres.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = '7'") == "1"


async def test_a_refusal_swallowed_by_a_handler_still_refuses_the_commit(postgres: PostgresStorage) -> None:
    postgres.contend("b")

    async def attempt() -> None:
        async with postgres.optimistic_transaction() as tx:
            await tx.claim_update(1, 20)
            await tx.read("a")
            with contextlib.suppress(Conflict):
                await tx.read("b")  # a contended key: refused, and the refusal swallowed
            await tx.write("a", StoredSession('{"count": 1}'))

    with pytest.raises(Conflict, match="'b' is contended"):
        await attempt()
    await _nothing_of_update_applied(postgres, 20)


async def test_a_chat_refused_again_right_after_a_refresh_takes_the_lock(database_url: str) -> None:
    first = await PostgresStorage.connect(database_url)
    second = await PostgresStorage.connect(database_url)
    try:
        run = Pipeline(counter_bot(), first, BotIdentity(1, "pizza_bot"), Metrics(), optimistic=True)
        await run.process(text_update(1, chat_id=7, text="+"))

        async def attempt() -> None:
            async with first.optimistic_transaction() as tx:
                await tx.claim_update(1, 2)
                stored = await tx.read("7")
                await _write_count(second, "7", 10)  # another process writes, as we speak
                assert stored is not None
                await tx.write("7", StoredSession('{"count": 2}'))

        with pytest.raises(StaleRead):
            await attempt()  # refreshed from the row that refused it
        with pytest.raises(Conflict) as refused:
            await attempt()  # and refused again: the chat is contended
        assert not isinstance(refused.value, StaleRead)
        assert first.contended("7") and first.cache.get("7") is None
    finally:
        await first.close()
        await second.close()


async def test_a_failed_transaction_leaves_the_remembered_sessions_it_did_not_touch(
    postgres: PostgresStorage,
) -> None:
    # They still name their row versions exactly (`_revision`): forgetting them all on any failure
    # would cost a read per chat after every transient error, and protect nothing.
    run = Pipeline(counter_bot(), postgres, BotIdentity(1, "pizza_bot"), Metrics(), optimistic=True)
    await run.process(text_update(1, chat_id=7, text="+"))

    async def fail() -> None:
        async with postgres.transaction() as tx:
            await tx.read("8")
            await tx.write("nul\x00", StoredSession("{}"))  # PostgreSQL refuses NUL in text

    with pytest.raises(StorageRefused):
        await fail()
    assert postgres.cache.get("7") is not None
    outcome = await run.process(text_update(2, chat_id=7, text="look"))
    assert [c.params["text"] for c in outcome.to_send] == ["1"]


@pytest.fixture
def restorable() -> Iterator[EmbeddedPostgres]:
    """A server of the test's own, whose data directory it may copy, and put back."""
    server = EmbeddedPostgres.throwaway()
    try:
        yield server
    finally:
        server.stop()


async def _copy_data_dir(server: EmbeddedPostgres, to: Path) -> None:
    """Copy the stopped server's data directory, owner and modes included (cp -a)."""
    await asyncio.to_thread(subprocess.run, ["cp", "-a", str(server.data_dir), str(to)], check=True)


async def _delivered(run: Pipeline, update: Update) -> Outcome:
    """Delivered again after a 503, as Telegram does: after a restart the pool may first meet a closed
    connection (PgBouncer, a server it has yet to reconnect to)."""
    for _ in range(100):
        with contextlib.suppress(StorageUnavailable):
            return await run.process(update)
        await asyncio.sleep(0.2)
    raise AssertionError(f"update {update.update_id} never applied")


@pytest.mark.slow
@pytest.mark.parametrize("route", ["direct", "pgbouncer"])
async def test_a_restored_database_that_reused_a_remembered_xmin_is_read_afresh(
    restorable: EmbeddedPostgres, tmp_path: Path, route: str
) -> None:
    server = restorable
    await migrate(server.dsn())
    bouncer = PgBouncer(server.dsn(), run_as=server.system_user) if route == "pgbouncer" else None
    url = bouncer.dsn() if bouncer is not None else server.dsn()
    storage = await PostgresStorage.connect(url, pooler="transaction" if bouncer else "none")
    admin = await asyncpg.connect(server.dsn())  # straight to the server, as an operator's psql
    try:
        run = Pipeline(counter_bot(), storage, BotIdentity(1, "pizza_bot"), Metrics(), optimistic=True)
        for update_id in range(1, 6):
            await _delivered(run, text_update(update_id, chat_id=7, text="+"))
        # A backup of the database at 5 (the data directory, as a base backup or a replica has it).
        await asyncio.to_thread(server.pause)
        await _copy_data_dir(server, tmp_path / "backup")
        await asyncio.to_thread(server.resume)
        await admin.close()
        await _delivered(run, text_update(6, chat_id=7, text="+"))  # 6, remembered with its xmin
        admin = await asyncpg.connect(server.dsn())
        xmin = int(await admin.fetchval("SELECT xmin::text FROM sessions WHERE key = '7'"))
        await admin.close()
        # The database goes back in time: restored from the backup (or a failover to a replica that was
        # at 5). The bot's pool reconnects by itself, and the process still remembers 6.
        await asyncio.to_thread(server.pause)
        await asyncio.to_thread(shutil.rmtree, server.data_dir)
        await asyncio.to_thread(
            subprocess.run, ["cp", "-a", str(tmp_path / "backup"), str(server.data_dir)], check=True
        )
        await asyncio.to_thread(server.resume)
        admin = await asyncpg.connect(server.dsn())
        # Transaction ids are handed out again from the backup's point. The one that wrote 6 now touches
        # the row without changing it (as another process reading the chat with a lock does).
        next_xid = "SELECT txid_snapshot_xmax(txid_current_snapshot())"  # the next to hand out
        assert await admin.fetchval(next_xid) <= xmin
        while await admin.fetchval(next_xid) < xmin:
            await admin.fetchval("SELECT txid_current()")  # hands one out
        touched = await admin.fetchval(
            "UPDATE sessions SET updated_at = now() WHERE key = '7' RETURNING xmin::text"
        )
        assert int(touched) == xmin
        assert storage.cache.get("7") is not None
        # The database's history says 5: the next look says so, and the next increment makes 6.
        outcome = await _delivered(run, text_update(7, chat_id=7, text="look"))
        assert [c.params["text"] for c in outcome.to_send] == ["5"]
        await _delivered(run, text_update(8, chat_id=7, text="+"))
        assert await admin.fetchval("SELECT data->>'count' FROM sessions WHERE key = '7'") == "6"
    finally:
        await admin.close()
        await storage.close()
        if bouncer is not None:
            bouncer.stop()


@pytest.mark.parametrize(
    ("key", "data", "refusal"),
    [
        ("8", '{"s": "\\u0000"}', "UntranslatableCharacterError"),  # jsonb refuses \u0000 in a string
        ("nul\x00", "{}", "CharacterNotInRepertoireError"),  # text refuses NUL
        # A key too long for the primary key's index (random: a repetitive one would be compressed).
        (secrets.token_hex(8000), "{}", "ProgramLimitExceededError"),
    ],
)
async def test_a_value_the_database_refuses_is_storage_refused_not_unavailable(
    postgres: PostgresStorage, key: str, data: str, refusal: str
) -> None:
    """Finding 3 of issue 16: refused data was StorageUnavailable, a 503 on every delivery. It is
    StorageRefused now: deterministic (the update becomes a dead letter), and nothing was written."""

    async def refused() -> None:
        async with postgres.transaction() as tx:
            await tx.read("9")
            await tx.write(key, StoredSession(data))

    with pytest.raises(StorageRefused, match=refusal):
        await refused()
    assert await postgres.pool.fetchval("SELECT count(*) FROM sessions") == 0


async def _write_count(storage: PostgresStorage, key: str, count: int) -> None:
    async with storage.transaction() as tx:
        await tx.read(key)
        await tx.write(key, StoredSession(f'{{"count": {count}}}'))


async def _nothing_of_update_applied(storage: PostgresStorage, update_id: int) -> None:
    pool = storage.pool
    assert await pool.fetchval("SELECT count(*) FROM processed_updates WHERE update_id = $1", update_id) == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE update_id = $1", update_id) == 0


async def test_an_optimistic_write_over_a_row_changed_since_the_read_conflicts_and_applies_nothing(
    postgres: PostgresStorage,
) -> None:
    await _write_count(postgres, "k", 1)

    async def attempt() -> None:
        async with postgres.optimistic_transaction() as tx:
            assert await tx.claim_update(1, 10)
            assert await tx.read("k") == StoredSession('{"count": 1}')
            await _write_count(postgres, "k", 5)  # another update of the chat commits meanwhile
            await tx.write("k", StoredSession('{"count": 2}'))
            await tx.enqueue(1, 10, [OutgoingCall("sendMessage", {"text": "2"})], lease=30)

    with pytest.raises(Conflict, match="changed since it was read"):
        await attempt()
    await _nothing_of_update_applied(postgres, 10)
    assert await postgres.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = 'k'") == "5"
    assert postgres.contended("k")  # the next updates of this chat take the lock straight away


async def test_an_optimistic_insert_of_a_session_created_meanwhile_conflicts(
    postgres: PostgresStorage,
) -> None:
    async def attempt() -> None:
        async with postgres.optimistic_transaction() as tx:
            await tx.claim_update(1, 11)
            assert await tx.read("new") is None
            await _write_count(postgres, "new", 3)
            await tx.write("new", StoredSession('{"count": 1}'))

    with pytest.raises(Conflict, match="changed since it was read"):
        await attempt()
    await _nothing_of_update_applied(postgres, 11)
    assert await postgres.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = 'new'") == "3"


async def test_an_optimistic_attempt_at_an_applied_update_conflicts_before_its_handler(
    postgres: PostgresStorage,
) -> None:
    async with postgres.transaction() as tx:
        assert await tx.claim_update(1, 12)

    async def attempt() -> None:
        async with postgres.optimistic_transaction() as tx:
            await tx.claim_update(1, 12)
            await tx.read("k")

    with pytest.raises(Conflict, match="redelivered"):
        await attempt()


async def test_an_optimistic_attempt_raced_by_its_redelivery_conflicts_and_applies_nothing(
    postgres: PostgresStorage,
) -> None:
    await _write_count(postgres, "k", 1)

    async def attempt() -> None:
        async with postgres.optimistic_transaction() as tx:
            await tx.claim_update(1, 13)
            await tx.read("k")
            async with postgres.transaction() as other:  # the redelivery, applied first elsewhere
                assert await other.claim_update(1, 13)
            await tx.write("k", StoredSession('{"count": 2}'))

    with pytest.raises(Conflict, match="UniqueViolation"):
        await attempt()
    assert await postgres.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = 'k'") == "1"
    assert await postgres.pool.fetchval("SELECT count(*) FROM outbox") == 0


async def _optimistic_count(storage: PostgresStorage, update_id: int, count: int) -> None:
    """One optimistic update of session "k" to `count`, as the pipeline would run it."""
    async with storage.optimistic_transaction() as tx:
        await tx.claim_update(1, update_id)
        await tx.read("k")
        await tx.write("k", StoredSession(f'{{"count": {count}}}'))


async def _until_a_statement_waits_for_a_lock(storage: PostgresStorage) -> None:
    """Until another connection's statement waits for a lock in this database: a fixed sleep would be too
    short on a loaded machine, and the step after it would then run before the wait it is meant to end."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    for _ in range(1000):  # 10 s at most
        if await storage.pool.fetchval(query):
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("no statement waits for a lock")


async def test_a_redelivery_running_with_locks_elsewhere_does_not_deadlock_an_optimistic_attempt(
    postgres: PostgresStorage,
) -> None:
    """Another process runs the same update with locks: it has claimed the id, not yet read the row.
    The optimistic statement must wait on the claim before it touches the row; the other way round,
    each waited for the other (a deadlock, found by PostgreSQL after a second: a 503)."""
    await _write_count(postgres, "k", 1)

    async with postgres.transaction() as locked:
        assert await locked.claim_update(1, 30)
        attempt = asyncio.create_task(_optimistic_count(postgres, 30, 2))
        await _until_a_statement_waits_for_a_lock(postgres)
        assert await asyncio.wait_for(locked.read("k"), 0.9) == StoredSession('{"count": 1}')
        await locked.write("k", StoredSession('{"count": 2}'))
    with pytest.raises(Conflict, match="UniqueViolation"):
        await attempt
    assert await postgres.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = 'k'") == "2"


async def test_a_row_changed_between_the_snapshot_and_the_write_rolls_the_claim_back(
    postgres: PostgresStorage,
) -> None:
    """Another process holds the row (with locks) when the statement starts, then commits a change:
    the version check saw the old row and claimed, the write then finds a newer version. Nothing of
    the statement may stay, the claim least of all."""
    await _write_count(postgres, "k", 1)

    async with postgres.transaction() as locked:
        await locked.read("k")  # holds the row
        attempt = asyncio.create_task(_optimistic_count(postgres, 31, 2))
        # It checked the version (unchanged in its snapshot), claimed, and waits for the row.
        await _until_a_statement_waits_for_a_lock(postgres)
        await locked.write("k", StoredSession('{"count": 5}'))
    with pytest.raises(Conflict, match="DivisionByZero"):
        await attempt
    await _nothing_of_update_applied(postgres, 31)
    assert await postgres.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = 'k'") == "5"


async def test_a_refresh_used_while_this_process_wrote_it_with_locks_is_not_remembered_again(
    database_url: str,
) -> None:
    """An update uses a refresh of "k" (learnt from a stale memory) without writing it, and its
    statement waits for another row's lock. Meanwhile an update of this process writes "k" with locks,
    which takes no turn: "k" is forgotten. The statement then applies (it checked "k" in its snapshot,
    before that write), and the refresh it used, stale now, must not be remembered again: else the
    next update of "k" once it is no longer shared is refused, and runs twice (StaleRead)."""
    first = await PostgresStorage.connect(database_url)
    second = await PostgresStorage.connect(database_url)
    try:
        await _write_count(second, "j", 0)
        await _optimistic_count(first, 1, 1)  # "k" remembered as written
        await _write_count(second, "k", 5)  # another process writes it
        with pytest.raises(StaleRead):
            await _optimistic_count(first, 2, 2)  # refused: "k" refreshed (5) and shared
        refreshed = first.cache.get("k")
        assert refreshed is not None and refreshed.refreshed

        async def uses_the_refresh() -> None:
            async with first.optimistic_transaction() as tx:
                await tx.claim_update(1, 3)
                assert await tx.read("k") == refreshed.session  # the refresh: no round trip
                await tx.read("j")
                await tx.write("j", StoredSession('{"count": 1}'))

        async with second.pool.acquire() as holder:
            locked = holder.transaction()
            await locked.start()
            await holder.execute("SELECT FROM sessions WHERE key = 'j' FOR UPDATE")
            attempt = asyncio.create_task(uses_the_refresh())
            await _until_a_statement_waits_for_a_lock(first)  # "k" checked, the claim made
            await _write_count(first, "k", 7)  # this process, with locks: "k" forgotten
            assert first.cache.get("k") is None
            await locked.rollback()  # "j" unchanged: the statement applies
        await attempt
        assert await first.pool.fetchval("SELECT count(*) FROM processed_updates WHERE update_id = 3") == 1
        remembered = first.cache.get("k")
        assert remembered is None or remembered.session == StoredSession('{"count": 7}'), remembered
        first.shared = Contended(PostgresStorage.SHARED_FOR)  # a minute later: "k" no longer shared
        await _optimistic_count(first, 4, 8)  # no stale memory to refuse: applies at once
        assert await first.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = 'k'") == "8"
    finally:
        await first.close()
        await second.close()


async def test_an_optimistic_update_applies_claim_write_and_replies_together(
    postgres: PostgresStorage,
) -> None:
    await _write_count(postgres, "k", 1)
    async with postgres.optimistic_transaction() as tx:
        await tx.claim_update(1, 14)
        await tx.read("k")
        await tx.write("k", StoredSession('{"count": 2}'), ttl=3600)
        pending = await tx.enqueue(
            1, 14, [OutgoingCall("a", {"n": 1}), OutgoingCall("b", {"n": 2})], lease=30
        )
    assert [(p.method, p.params) for p in pending] == [("a", {"n": 1}), ("b", {"n": 2})]
    row = await postgres.pool.fetchrow("SELECT data->>'count' AS n, expires_at > now() AS ttl FROM sessions")
    assert (row["n"], row["ttl"]) == ("2", True)
    assert await postgres.pool.fetchval("SELECT count(*) FROM processed_updates WHERE update_id = 14") == 1


async def test_an_optimistic_delete_beside_a_write_of_another_key(postgres: PostgresStorage) -> None:
    await _write_count(postgres, "k", 1)
    async with postgres.optimistic_transaction() as tx:
        await tx.claim_update(1, 15)
        await tx.read("k")
        assert await tx.read("new") is None
        await tx.delete("k")
        await tx.write("new", StoredSession('{"count": 1}'))
    rows = await postgres.pool.fetch("SELECT key, data->>'count' AS n FROM sessions")
    assert [tuple(r) for r in rows] == [("new", "1")]


@pytest.mark.parametrize(
    ("there", "changes", "left"),
    [
        (False, ["delete"], None),  # nothing to delete: the statement writes no row, and still claims
        (False, ["delete", "write"], "2"),
        (False, ["write", "delete"], None),
        (True, [], "1"),  # read, not written: checked only
        (True, ["delete", "write"], "2"),
        (True, ["write", "delete"], None),
    ],
)
async def test_an_optimistic_session_ends_as_its_last_write_or_delete_left_it(
    postgres: PostgresStorage, there: bool, changes: list[str], left: str | None
) -> None:
    if there:
        await _write_count(postgres, "k", 1)
    async with postgres.optimistic_transaction() as tx:
        await tx.claim_update(1, 16)
        await tx.read("k")
        for change in changes:
            if change == "write":
                await tx.write("k", StoredSession('{"count": 2}'))
            else:
                await tx.delete("k")
    assert await postgres.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = 'k'") == left
    assert await postgres.pool.fetchval("SELECT count(*) FROM processed_updates WHERE update_id = 16") == 1


@pytest.mark.parametrize("change", ["write", "delete"])
async def test_an_optimistic_change_of_a_session_not_read_gives_up_even_if_the_handler_swallows_it(
    postgres: PostgresStorage, change: str
) -> None:
    await _write_count(postgres, "k", 1)
    refusal = "session 'other' written without being read: run it with locks"

    async def attempt() -> None:
        async with postgres.optimistic_transaction() as tx:
            await tx.claim_update(1, 17)
            await tx.read("k")
            await tx.write("k", StoredSession('{"count": 2}'))
            with pytest.raises(Conflict, match=refusal):  # and the handler swallows it
                await (tx.write("other", StoredSession("{}")) if change == "write" else tx.delete("other"))

    with pytest.raises(Conflict, match=refusal):  # again at the end: nothing of it applied
        await attempt()
    await _nothing_of_update_applied(postgres, 17)
    assert await postgres.pool.fetchval("SELECT data->>'count' FROM sessions WHERE key = 'k'") == "1"


async def test_values_that_cannot_be_sql_literals_still_commit(postgres: PostgresStorage) -> None:
    """The COMMIT rides with the writes as literals; quotes and backslashes must survive, and a NUL
    (which no literal can carry) falls back to parameters."""
    data = '{"s": "it\'s a \\\\ back\\"slash"}'
    async with postgres.transaction() as tx:
        await tx.read("o'k\\")
        await tx.write("o'k\\", StoredSession(data))
    async with postgres.transaction() as tx:
        stored = await tx.read("o'k\\")
    assert stored is not None and json.loads(stored.data) == json.loads(data)

    async def write_nul() -> None:
        async with postgres.transaction() as tx:
            await tx.write("nul\x00", StoredSession("{}"))

    with pytest.raises(StorageRefused, match="write sessions"):  # PostgreSQL refuses NUL in text
        await write_nul()


async def test_an_optimistic_statement_that_applies_reads_no_remembered_row_again(database_url: str) -> None:
    """A remembered row comes back with the statement only when it changed (to refresh what this process
    remembers): for an update that applies, that part of the plan never runs (no index scan, no jsonb
    turned into text), as EXPLAIN ANALYZE shows."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO sessions (key, data, version) VALUES ('7', '{\"n\": 1}', 1)")
        current = await conn.fetchval(f"SELECT {revision()} FROM sessions WHERE key = '7'")
        text = "EXPLAIN (ANALYZE, COSTS OFF) " + apply_text("5000ms", CLAIM, (True,), ((0, False),), 0)
        for remembered, changed in ((current, False), ("0:0", True)):
            attempt = conn.transaction()
            await attempt.start()  # (rolled back: EXPLAIN ANALYZE runs the statement)
            try:
                plan = [row[0] for row in await conn.fetch(text, "7", remembered, 1, 1, '{"n": 2}', 1, None)]
            finally:
                await attempt.rollback()
            gated = [n for n, line in enumerate(plan) if "One-Time Filter: (NOT v.u0)" in line]
            assert gated, plan  # the remembered row's read runs only when it changed
            scan = next(line for line in plan[gated[0] :] if "Index Scan" in line)
            assert ("never executed" not in scan) is changed, plan
    finally:
        await conn.close()
