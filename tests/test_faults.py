"""Exactly once under faults, with real processes: `python -m bot serve` on real PostgreSQL.

Each test delivers updates as Telegram does (redelivering anything that did not get a 2xx), injects a
fault in the middle, and then checks every chat's count with /hunger and every /hunger's reply count.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from bot.app import SECRET_HEADER
from bot.apps.pizza_testing import PIZZA, hunger
from bot.pooler import transaction_pooler
from bot.testing.delivery import DeliveryStats, LoopbackHttp, Poster, deliver
from bot.testing.env import FAULT_ENV, SECRET, USERNAME, bot_env
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import BotProcess
from bot.testing.updates import callback_update, encode, message_update

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

RESULTS: dict[str, dict[str, Any]] = {}

# check_counts asks up to 200 chats at once: at Telegram's default 30 replies a second the bot would take
# seconds to let the answers out, which no test here is about (test_outbox.py tests the pacing).
UNPACED = {"SEND_RATE_GLOBAL": "1000"}

# The exactness tests run twice: straight to PostgreSQL, and through PgBouncer in transaction mode.
BOTH_ROUTES = pytest.mark.parametrize("route", ["direct", "pgbouncer"])


@pytest.fixture(scope="module", autouse=True)
def _write_results() -> Iterator[None]:
    """Keep this run's numbers in bench/results/faults.txt for docs/RELIABILITY.md's table."""
    yield
    out = Path(__file__).parent.parent / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{name}: {values}" for name, values in RESULTS.items()]
    (out / "faults.txt").write_text(time.strftime("%Y-%m-%d %H:%M\n") + "\n".join(lines) + "\n")


@pytest.fixture
def route() -> str:
    """How the bot reaches PostgreSQL: "direct", or "pgbouncer" (transaction mode) where a test is
    parametrized with it."""
    return "direct"


@pytest.fixture
def start_bot(
    database_url: str, telegram_root: str, tmp_path: Path, route: str, request: pytest.FixtureRequest
) -> Iterator[Any]:
    started: list[BotProcess] = []
    url = database_url
    pooled: dict[str, str] = {}
    if route == "pgbouncer":
        url = request.getfixturevalue("pgbouncer").pooled(database_url)
        pooled = {"DB_POOLER": "transaction"}

    def start(port: int | None = None, **env: str) -> BotProcess:
        process = BotProcess(
            bot_env(url, telegram_root, **{**FAULT_ENV, **UNPACED, **pooled, **env}),
            tmp_path / f"bot-{len(started)}.log",
            port=port,
        )
        started.append(process)
        process.wait_ready()
        return process

    yield start
    for process in started:
        process.close()
    for process in started:
        # A database fault is never a bug's: that would dead-letter an update its redelivery applies.
        assert "is a dead letter" not in process.output()


def workload(
    chats: int, per_chat: int, first_id: int = 1, seed: int = 1
) -> tuple[list[dict[str, Any]], Counter[int]]:
    """Pizzas (and plain texts) for `chats` chats, shuffled; returns them and the expected counts."""
    rng = random.Random(seed)
    updates, expected = [], Counter[int]()
    update_id = first_id
    for chat in range(chats):
        chat_id = -1000 - chat
        for _ in range(per_chat):
            pizza = rng.random() < 0.5
            updates.append(message_update(update_id, chat_id, f"{PIZZA} yum" if pizza else "hello"))
            expected[chat_id] += pizza
            update_id += 1
    rng.shuffle(updates)
    return updates, expected


async def check_counts(
    client: Poster, url: str, fake: FakeTelegram, expected: Counter[int], first_id: int
) -> None:
    """Ask /hunger in every chat; each must be answered exactly once, with the exact count."""
    fake.reset()
    asks = [hunger(first_id + i, chat_id, username=USERNAME) for i, chat_id in enumerate(sorted(expected))]
    await deliver(client, lambda: url + "/webhook", SECRET, asks, in_flight=16)
    await fake.wait_for_async(lambda: len(fake.sent_messages()) >= len(asks), timeout=30)
    await asyncio.sleep(0.5)  # a doubled reply would arrive now
    got = Counter((m["chat_id"], m["text"]) for m in fake.sent_messages())
    want = Counter((chat_id, f"Your hunger level is {n}!") for chat_id, n in expected.items())
    assert got == want


def record(name: str, stats: DeliveryStats, **extra: Any) -> None:
    RESULTS[name] = {
        "sent": stats.delivered,
        "attempts": stats.attempts,
        "redelivered": stats.redelivered,
        **extra,
    }
    print(f"\n{name}: {RESULTS[name]}")


@BOTH_ROUTES
async def test_two_processes_share_one_hot_chat_without_losing_an_increment(
    start_bot: Any, fake: FakeTelegram, route: str
) -> None:
    first, second = start_bot(), start_bot()
    updates = [message_update(i, -77, PIZZA) for i in range(1, 2001)]
    turn = iter(range(10**9))
    urls = [first.url + "/webhook", second.url + "/webhook"]
    async with LoopbackHttp(timeout=30) as client:
        stats = await deliver(client, lambda: urls[next(turn) % 2], SECRET, updates, in_flight=64)
        await check_counts(client, first.url, fake, Counter({-77: 2000}), 10**6)
    record(f"two processes, one chat ({route})", stats, lost=0, doubled=0)


async def test_two_processes_share_a_group_s_list_and_its_people_s_stats(
    start_bot: Any, database_url: str
) -> None:
    """examples/todo.py, two sessions per update (the group's list, the sender's stats), served by two
    processes at once: every /add and every press lands once in both rows. Its timing middleware logs
    each run of a handler: most run once (a transaction taking one session only ran every one of them
    twice, the second time with locks)."""
    bots = [start_bot(APP="examples.todo:build_bot", LOG_LEVEL="INFO") for _ in range(2)]
    group, people = -500, (11, 22, 33, 44)
    adds = [message_update(n, group, f"/add task {n}", from_id=people[n % 4]) for n in range(1, 21)]
    presses = [callback_update(100 + n, group, people[n % 4], f"done:{n}") for n in range(1, 21)]
    turn = iter(range(10**9))
    urls = [b.url + "/webhook" for b in bots]
    async with LoopbackHttp(timeout=30) as client:
        for wave in (adds, presses):  # a task is pressed once it is on the list
            await deliver(client, lambda: urls[next(turn) % 2], SECRET, wave, in_flight=16)
    db = await asyncpg.connect(database_url)
    try:
        rows = await db.fetch("SELECT key, data::text AS data FROM sessions WHERE key LIKE 'todo%'")
    finally:
        await db.close()
    found = {r["key"]: json.loads(r["data"]) for r in rows}
    todo = found.pop(f"todo:{group}")
    assert sorted(t["id"] for t in todo["tasks"]) == list(range(1, 21))
    assert all(t["done"] for t in todo["tasks"]) and todo["next_id"] == 21
    assert found == {f"todo-user:{p}": {"added": 5, "done": 5, "cheers": 0} for p in people}
    # Counted once both have exited: a busy process's INFO lines wait in its log queue (bot.logs) and
    # reach the file a moment after the answers they came before; stopping writes out the rest.
    assert [b.terminate() for b in bots] == [0, 0]
    runs = sum(b.output().count(kind) for b in bots for kind in ("(message): ", "(callback_query): "))
    assert len(adds) + len(presses) <= runs < 2 * (len(adds) + len(presses))


@BOTH_ROUTES
async def test_redelivered_updates_are_applied_once(start_bot: Any, fake: FakeTelegram, route: str) -> None:
    bot = start_bot()
    updates, expected = workload(chats=25, per_chat=20)
    asks = [hunger(10_000 + i, -1000 - i % 25) for i in range(50)]
    async with LoopbackHttp(timeout=30) as client:
        # Every update twice: half of the second copies overlap the first attempt.
        stats = await deliver(
            client, lambda: bot.url + "/webhook", SECRET, updates + asks, duplicate_share=0.5
        )
        again = await deliver(client, lambda: bot.url + "/webhook", SECRET, updates + asks, in_flight=32)
        await fake.wait_for_async(lambda: len(fake.sent_messages()) >= len(asks), timeout=30)
        await asyncio.sleep(0.5)
        assert len(fake.sent_messages()) == len(asks)  # one reply per /hunger, however often delivered
        await check_counts(client, bot.url, fake, expected, 10**6)
    record(f"redelivery ({route})", stats, resent=again.delivered, lost=0, doubled=0)


async def test_kill_9_mid_load_then_a_fresh_process_serves_the_rest(
    start_bot: Any, fake: FakeTelegram
) -> None:
    # Paced as Telegram's default: the kill then finds replies committed and not yet sent.
    bot = start_bot(SEND_RATE_GLOBAL="30")
    port = bot.port
    updates, expected = workload(chats=50, per_chat=20)
    asks = [hunger(50_000 + i, -1000 - i) for i in range(50)]
    mixed = updates[:500] + asks + updates[500:]
    current = [bot]
    killed_at: list[float] = []

    async def killer() -> None:
        # Mid-load: some /hunger replies have gone out, more are committed and not yet sent.
        await fake.wait_for_async(lambda: len(fake.sent_messages()) >= 10, timeout=60)
        await asyncio.sleep(0.05)
        current[0].kill()
        killed_at.append(time.time())  # the process is gone now
        current[0] = await asyncio.to_thread(start_bot, port, SEND_RATE_GLOBAL="30")

    # httpx, not LoopbackHttp: at httpx's pace the load lasts through the fault (the lean client
    # delivers it in a fraction of a second, over before the fault comes).
    async with httpx.AsyncClient(timeout=30) as client:
        kill = asyncio.create_task(killer())
        stats = await deliver(client, lambda: f"http://127.0.0.1:{port}/webhook", SECRET, mixed, in_flight=16)
        await kill
        # Every mid-load /hunger is answered exactly once: the new process's sweeper sends what the killed
        # one committed but never sent.
        await fake.wait_for_async(lambda: len({m["chat_id"] for m in fake.sent_messages()}) >= len(asks), 30)
        await asyncio.sleep(1.5)
        sends = fake.calls("sendMessage")
        per_chat = Counter(c.params["chat_id"] for c in sends)
        assert set(per_chat) == {a.json()["message"]["chat"]["id"] for a in asks}  # none lost
        # Telegram has no idempotency key: a reply the killed process had sent but not yet recorded as
        # sent is sent again. Only those may be doubled: the first copy from the dead process (arriving at
        # most a moment after its death, from socket buffers), the second from the new one.
        doubled = sorted(chat for chat, n in per_chat.items() if n > 1)
        for chat in doubled:
            times = [c.at for c in sends if c.params["chat_id"] == chat]
            print(chat, [round(t - killed_at[0], 4) for t in times])
            assert len(times) == 2
            assert times[0] < killed_at[0] + 0.1
            assert times[1] > killed_at[0]
        await check_counts(client, current[0].url, fake, expected, 10**6)
    record("kill -9 mid-load", stats, lost=0, doubled=0, replies_sent_twice=len(doubled))


async def test_postgres_restart_mid_load_the_bot_recovers_by_itself(
    start_bot: Any, fake: FakeTelegram, pg_cluster: Any
) -> None:
    if not hasattr(pg_cluster, "restart"):
        pytest.skip("TEST_DATABASE_URL points at a server this test cannot restart")
    bot = start_bot()
    updates, expected = workload(chats=40, per_chat=25)
    # httpx, not LoopbackHttp: at httpx's pace the load lasts through the fault (the lean client
    # delivers it in a fraction of a second, over before the fault comes).
    async with httpx.AsyncClient(timeout=30) as client:
        restarted = threading.Event()

        async def restart_soon() -> None:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(pg_cluster.restart)
            restarted.set()

        task = asyncio.create_task(restart_soon())
        stats = await deliver(client, lambda: bot.url + "/webhook", SECRET, updates, in_flight=16)
        await task
        assert restarted.is_set()
        assert bot.proc.poll() is None  # the same process, never restarted
        await check_counts(client, bot.url, fake, expected, 10**6)
    assert stats.statuses.get(503, 0) + stats.statuses.get(0, 0) > 0, "the restart should have been felt"
    record("PostgreSQL restart", stats, answered_503=stats.statuses.get(503, 0), lost=0, doubled=0)


@BOTH_ROUTES
async def test_terminated_backends_mid_load_lose_and_double_nothing(
    start_bot: Any, fake: FakeTelegram, database_url: str, route: str
) -> None:
    bot = start_bot()
    updates, expected = workload(chats=40, per_chat=25)
    killed = 0

    async def terminate_backends() -> None:
        nonlocal killed
        conn = await asyncpg.connect(database_url)
        try:
            for _ in range(20):
                await asyncio.sleep(0.05)
                killed += await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'pizza-bot' AND datname = current_database()"
                )
        finally:
            await conn.close()

    # httpx, not LoopbackHttp: at httpx's pace the load lasts through the fault (the lean client
    # delivers it in a fraction of a second, over before the fault comes).
    async with httpx.AsyncClient(timeout=30) as client:
        task = asyncio.create_task(terminate_backends())
        stats = await deliver(client, lambda: bot.url + "/webhook", SECRET, updates, in_flight=16)
        await task
        assert killed > 0
        assert bot.proc.poll() is None
        await check_counts(client, bot.url, fake, expected, 10**6)
    record(f"pg_terminate_backend ({route})", stats, backends_killed=killed, lost=0, doubled=0)


@pytest.mark.parametrize("route", ["pgbouncer"])
@pytest.mark.parametrize("setting", ["auto", "none"])
async def test_a_transaction_pooler_on_a_port_auto_does_not_know_answers_no_503(
    start_bot: Any, fake: FakeTelegram, pgbouncer: Any, database_url: str, route: str, setting: str
) -> None:
    # The pooler's port is a free one, neither 6432 nor 6543: the URL does not say "pooler". Its server
    # sessions hold the statement names a new process prepares first, as another client left them.
    assert not transaction_pooler(pgbouncer.pooled(database_url))
    await pgbouncer.leave_prepared_statements(database_url)
    bot = start_bot(DB_POOLER=setting)
    updates, expected = workload(chats=200, per_chat=10)  # 2,000
    async with LoopbackHttp(timeout=30) as client:
        # Telegram-like: 40 in flight, one per chat at a time, anything but a 2xx delivered again.
        stats = await deliver(
            client, lambda: bot.url + "/webhook", SECRET, updates, in_flight=40, one_per_chat=True
        )
        await check_counts(client, bot.url, fake, expected, 10**6)
    # auto asks the server at start-up and finds the pooler; with none, the first broken prepared
    # statement switches the pool, with one warning, and the update runs again: no 503 either way.
    switches = bot.output().count("set DB_POOLER=transaction")
    assert switches == (0 if setting == "auto" else 1), bot.output()[-3000:]
    assert stats.statuses.get(503, 0) == 0, dict(stats.statuses)
    record(f"unrecognised pooler, DB_POOLER={setting}", stats, answered_503=0, lost=0, doubled=0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT as Fly sends it"])
async def test_a_stop_signal_finishes_requests_in_flight_and_exits_cleanly(
    start_bot: Any, fake: FakeTelegram, database_url: str, signum: int
) -> None:
    bot = start_bot(DB_LOCK_TIMEOUT="20")
    updates = [message_update(i, -88, PIZZA) for i in range(1, 21)]
    async with LoopbackHttp(timeout=30) as client:
        blocker = await asyncpg.connect(database_url)
        try:
            await deliver(client, lambda: bot.url + "/webhook", SECRET, updates[:1])
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("SELECT 1 FROM sessions WHERE key = '-88' FOR UPDATE")
            sending = asyncio.create_task(
                deliver(client, lambda: bot.url + "/webhook", SECRET, updates[1:], give_up_after=5)
            )
            await asyncio.sleep(0.5)  # all 19 are now waiting for the row lock inside the bot
            stopping = asyncio.create_task(asyncio.to_thread(bot.terminate, 30.0, signum))
            await asyncio.sleep(0.5)
            await tx.rollback()
            stats = await sending
            assert await stopping == 0
        finally:
            await blocker.close()
        assert stats.attempts == 19  # none needed a second try: the in-flight ones were finished
        assert "Traceback" not in bot.output() and "KeyboardInterrupt" not in bot.output()
        fresh = start_bot()
        await check_counts(client, fresh.url, fake, Counter({-88: 20}), 10**6)


async def test_while_the_database_is_away_readiness_is_503_and_updates_wait_for_it(
    start_bot: Any, fake: FakeTelegram, pg_cluster: Any
) -> None:
    if not hasattr(pg_cluster, "pause"):
        pytest.skip("TEST_DATABASE_URL points at a server this test cannot stop")
    bot = start_bot()
    async with httpx.AsyncClient(timeout=30) as client:
        await deliver(client, lambda: bot.url + "/webhook", SECRET, [message_update(1, -99, PIZZA)])
        await asyncio.to_thread(pg_cluster.pause)
        try:
            assert (await client.get(bot.url + "/healthz")).status_code == 200  # the process still serves
            assert (await client.get(bot.url + "/readyz")).status_code == 503
            attempt = await client.post(
                bot.url + "/webhook",
                content=encode(message_update(2, -99, PIZZA)),
                headers={SECRET_HEADER: SECRET, "content-type": "application/json"},
            )
            assert attempt.status_code == 503  # Telegram will deliver it again
        finally:
            await asyncio.to_thread(pg_cluster.resume)
        assert (await client.get(bot.url + "/readyz")).status_code == 200  # no restart of the bot needed
        await deliver(client, lambda: bot.url + "/webhook", SECRET, [message_update(2, -99, PIZZA)])
        assert bot.proc.poll() is None
        await check_counts(client, bot.url, fake, Counter({-99: 2}), 10**6)
