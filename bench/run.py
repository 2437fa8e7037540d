"""Benchmark: the ACCEPTANCE.md workloads over HTTP on loopback, and the raw-PostgreSQL limit beside them.

    .venv/bin/python bench/run.py                 # all workloads, one bot process
    .venv/bin/python bench/run.py -w A,T -p 2     # some workloads, two bot processes
    .venv/bin/python bench/run.py --quick         # a smoke run: a tenth of every workload

Each row (workload, system, repetition) gets a database of its own, migrated by the code that runs on it
(a `bot@DIR` by DIR's Procfile `release:` command) and dropped after the row, and fresh servers talking to
the fake Bot API. Our bot runs as deployed: the Procfile's web command (listening on 127.0.0.1 instead of
all interfaces), with only what a user must set (DATABASE_URL, PORT, BOT_TOKEN, WEBHOOK_SECRET,
WEBHOOK_URL, and TELEGRAM_API_ROOT pointing at the fake): every other setting at the README's default,
none taken from this shell's environment. Updates are delivered as Telegram does (redelivered until a
2xx), then every chat is asked /hunger and the answers are compared with what was sent: lost and extra
increments are counted, not assumed.
Uses DATABASE_URL when set, else a throwaway embedded PostgreSQL. Bounded: loopback only, fixed counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from asyncio.subprocess import DEVNULL
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg

from bot.apps.pizza_testing import PIZZA, hunger
from bot.config import load_settings
from bot.embedded import EmbeddedPostgres
from bot.migrate import migrate
from bot.testing.delivery import DeliveryStats, LoopbackHttp, Poster, deliver
from bot.testing.env import SECRET, USERNAME, bot_env
from bot.testing.fake_telegram import FakeTelegram, serve
from bot.testing.processes import BotProcess
from bot.testing.updates import command_update, message_update
from bot.types import Update


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    chats: int
    per_chat: int
    in_flight: int
    pizza_share: float
    duplicate_share: float = 0.0
    one_per_chat: bool = False

    def quick(self) -> Workload:
        """A tenth of the updates, for a smoke run: a tenth of the chats, or of one chat's messages."""
        if self.chats > 1:
            return replace(self, chats=self.chats // 10)
        return replace(self, per_chat=self.per_chat // 10)


WORKLOADS = {
    w.name: w
    for w in (
        Workload("A", "many chats", 1000, 10, 32, 0.5),
        Workload("B", "hot chat", 1, 2000, 32, 1.0),
        Workload("C", "redeliveries", 100, 20, 16, 0.5, duplicate_share=0.1),
        Workload("T", "Telegram-like", 1000, 10, 40, 0.5, one_per_chat=True),
        Workload("G", "one busy group", 1, 1000, 1, 0.5),
    )
}


SENDERS = 2  # people writing in each chat, each only there: two-session updates that no other chat's touch


def sender(chat: int, message: int) -> int:
    return 2_000_000 + chat * SENDERS + message % SENDERS


@dataclass(frozen=True)
class Expected:
    """What the bots must answer at the end: each chat's count, and each (chat, sender)'s own."""

    chats: Counter[int]
    eaters: Counter[tuple[int, int]]


def make_updates(w: Workload, seed: int = 7) -> tuple[list[Update], Expected]:
    rng = random.Random(seed)
    updates: list[Update] = []
    expected = Expected(Counter(), Counter())
    update_id = 1
    for chat in range(w.chats):
        chat_id = -100_000 - chat
        expected.chats[chat_id] += 0
        for n in range(w.per_chat):
            pizza = rng.random() < w.pizza_share
            text = f"{PIZZA} please" if pizza else "hi all"
            user = sender(chat, n)
            updates.append(message_update(update_id, chat_id, text, from_id=user))
            expected.chats[chat_id] += pizza
            expected.eaters[chat_id, user] += pizza
            update_id += 1
    if not w.one_per_chat and w.in_flight > 1:
        rng.shuffle(updates)  # Telegram-like keeps each chat's order; the others don't need to
    return updates, expected


async def ask(
    client: Poster, urls: list[str], fake: FakeTelegram, asks: list[Update]
) -> list[dict[str, Any]]:
    """Deliver these commands (to the urls in turn) and return the replies sent (chat_id, text...)."""
    fake.reset()
    turn = iter(range(10**9))
    await deliver(client, lambda: urls[next(turn) % len(urls)], SECRET, asks, in_flight=32)
    await fake.wait_for_async(lambda: len(fake.sent_messages()) >= len(asks), timeout=120)
    return fake.sent_messages()


def compare(counts: Mapping[Any, int], expected: Mapping[Any, int]) -> tuple[int, int]:
    """(lost, extra) increments summed over keys."""
    lost = sum(max(0, n - counts.get(key, 0)) for key, n in expected.items())
    extra = sum(max(0, counts.get(key, 0) - n) for key, n in expected.items())
    return lost, extra


async def verify(
    client: Poster, url: str, fake: FakeTelegram, expected: Expected, *, per_user: bool
) -> tuple[int, int]:
    """Ask /hunger in every chat; return (lost, extra) increments summed over chats. `per_user` (the
    two-session bot): asked as each sender, whose own count is checked too and added in."""
    if not per_user:
        chats = sorted(expected.chats)
        replies = await ask(
            client, [url], fake, [hunger(10_000_000 + i, c, username=USERNAME) for i, c in enumerate(chats)]
        )
        return compare({m["chat_id"]: int(re.findall(r"\d+", m["text"])[0]) for m in replies}, expected.chats)
    pairs = sorted(expected.eaters)
    asks = [hunger(10_000_000 + i, c, username=USERNAME, from_id=u) for i, (c, u) in enumerate(pairs)]
    by_chat: dict[int, int] = {}
    by_sender: dict[tuple[int, int], int] = {}
    for message in await ask(client, [url], fake, asks):
        chat_count, user, own = (int(n) for n in re.findall(r"\d+", message["text"]))
        by_chat[message["chat_id"]] = chat_count
        by_sender[message["chat_id"], user] = own
    (lost, extra), (lost_own, extra_own) = (
        compare(by_chat, expected.chats),
        compare(by_sender, expected.eaters),
    )
    return lost + lost_own, extra + extra_own


async def handler_runs(client: Poster, urls: list[str], fake: FakeTelegram) -> int:
    """The two-session bot's count of handler runs, summed over its processes (`/runs` to each)."""
    replies = await ask(
        client, urls, fake, [command_update(20_000_000 + i, 1, "runs") for i in range(len(urls))]
    )
    return sum(int(m["text"].split()[1]) for m in replies)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


@dataclass(frozen=True)
class System:
    """What a row measures. On the command line: `bot` (the pizza bot), `bot2` (the two-session bot,
    bench/apps/two_sessions.py), either as `bot@DIR` (the code of another checkout, to compare old and
    new in one run) and with settings (`bot+NAME=VALUE+...`, `bot@DIR+NAME=VALUE`), `grammy`, `raw`."""

    kind: str
    env: tuple[tuple[str, str], ...] = ()
    checkout: Path | None = None

    @classmethod
    def parse(cls, text: str) -> System:
        head, *settings = text.strip().split("+")
        kind, _, where = head.partition("@")
        ours = kind in ("bot", "bot2")
        if kind not in ("bot", "bot2", "grammy", "raw") or ((settings or where) and not ours):
            raise ValueError(f"unknown system {text!r}: bot, bot2, bot@DIR, bot+NAME=VALUE..., grammy or raw")
        checkout = Path(where).resolve() if where else None
        if checkout is not None and not (checkout / "bot" / "__init__.py").is_file():
            raise ValueError(f"{text!r}: {checkout} is not a checkout of this project (no bot/__init__.py)")
        return cls(kind, tuple(tuple(s.split("=", 1)) for s in settings), checkout)  # type: ignore[misc]

    @property
    def label(self) -> str:
        names = {
            "bot": "this bot",
            "bot2": "two sessions",
            "grammy": "grammY + pg.Pool",
            "raw": "raw asyncpg",
        }
        where = [f"@{self.checkout.name}"] if self.checkout is not None else []
        return " ".join([names[self.kind], *where, *(f"{k}={v}" for k, v in self.env)])


HERE = Path(__file__).resolve().parent
# py-spy installed in this interpreter's environment (pip install py-spy), else on PATH.
PY_SPY = (
    shutil.which(
        "py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    or "py-spy"
)
ROOT = HERE.parent
APPS = HERE / "apps"  # the benchmark's own bots, put on PYTHONPATH


def procfile_command(checkout: Path, python: str, role: str) -> list[str]:
    """The Procfile's command for `role` (web, release) in that checkout, run by `python`."""
    for line in (checkout / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == role:
            words = shlex.split(command)
            break
    else:
        raise RuntimeError(f"{checkout / 'Procfile'} has no {role}: line")
    if words[0] in ("python", "python3"):
        words[0] = python
    return words


def web_command(checkout: Path, python: str, app: str | None) -> list[str]:
    """The Procfile's `web:` command of that checkout, run by `python`, listening on loopback only (a
    PaaS listens on all interfaces; the benchmark keeps to 127.0.0.1), with `--app` when not the pizza bot."""
    words = procfile_command(checkout, python, "web")
    if "--host" in words:
        words[words.index("--host") + 1] = "127.0.0.1"
    return words + (["--app", app] if app else [])


def deployed_env(dsn: str, root: str) -> dict[str, str]:
    """What a user sets (bot_env's test-only OUTBOX_SWEEP_INTERVAL left out): everything else is a default,
    but for the bot's send rate, which only the check at the end uses (no update of a workload gets a
    reply): at the default 30/s, answering 1,000 chats' /hunger would take half a minute per row."""
    env = {k: v for k, v in bot_env(dsn, root).items() if k != "OUTBOX_SWEEP_INTERVAL"}
    return env | {"SEND_RATE_GLOBAL": "1000"}


def bot_settings() -> set[str]:
    """The names of the environment variables the bot reads (asked of a recording mapping)."""

    asked: set[str] = set()

    class Recording(dict[str, str]):
        def get(self, key: str, default: Any = None) -> Any:
            asked.add(key)
            return super().get(key, default)

    env = Recording(bot_env("postgresql://u@127.0.0.1/db", "http://127.0.0.1:1"))
    load_settings(env)
    return asked


GRAMMY = Path(__file__).parent / "grammy"


def grammy_ready() -> str | None:
    """None when the grammY bot can run; else why not (it is then left out, with that message)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not found: the grammY comparison is skipped"
    if not (GRAMMY / "node_modules").is_dir():
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=GRAMMY, capture_output=True, text=True
        )
        if done.returncode != 0:
            return (
                f"`npm ci` in {GRAMMY} failed, the grammY comparison is skipped: {done.stderr.strip()[-500:]}"
            )
    return None


def _tree(pid: int) -> list[int]:
    """The process and its descendants (uvicorn's workers with WEB_CONCURRENCY > 1)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                pids += _tree(int(child))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their descendants so far."""
    ticks = 0
    for pid in {p for root in pids for p in _tree(root)}:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


async def database_server(dsn: str) -> list[int]:
    """The database server's postmaster, when it runs on this machine: its CPU and its backends' (live,
    and those it reaped) is the database's share of an update. Empty when it cannot be found (another
    host, a data directory this user cannot read): the column then says "-"."""
    try:
        conn = await asyncpg.connect(dsn)
        try:
            directory = await conn.fetchval("SHOW data_directory")
        finally:
            await conn.close()
        return [int((Path(directory) / "postmaster.pid").read_text().split()[0])]
    except (OSError, ValueError, asyncpg.PostgresError):
        return []


def per_update_us(seconds: float | None, updates: int) -> int | str:
    return "-" if seconds is None else round(seconds / updates * 1e6)


def peak_rss_mb(pids: list[int]) -> float:
    """The largest peak resident set (VmHWM) of any one of these processes or their descendants."""
    peak = 0
    for pid in {p for root in pids for p in _tree(root)}:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
    return peak / 1024


def checkout_of(system: System) -> tuple[Path, str]:
    """Where one of our systems runs from, and its interpreter: the checkout's .venv when it has one."""
    cwd = system.checkout or ROOT
    venv = cwd / ".venv" / "bin" / "python"
    return cwd, str(venv) if system.checkout is not None and venv.is_file() else sys.executable


def checkout_path(cwd: Path, env: Mapping[str, str]) -> str:
    """PYTHONPATH: the checkout's own code first, whatever this interpreter has installed; the bench's bots
    after. (A PYTHONPATH given as a setting comes after: e.g. a sitecustomize.py probing the server.)"""
    return os.pathsep.join([str(cwd), str(APPS), *filter(None, [env.get("PYTHONPATH")])])


def release(system: System, dsn: str, root: str, logs: Path) -> None:
    """Migrate an empty database as a deploy does: the system's checkout's Procfile `release:` command, so
    an old checkout's database holds its own migrations only (it refuses to start on a newer schema)."""
    cwd, python = checkout_of(system)
    env = {**os.environ, **deployed_env(dsn, root), **dict(system.env)}
    env["PYTHONPATH"] = checkout_path(cwd, env)
    done = subprocess.run(
        procfile_command(cwd, python, "release"), env=env, cwd=cwd, capture_output=True, text=True
    )
    (logs / f"release-{uuid.uuid4().hex[:6]}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{system.label}: release failed:\n{(done.stdout + done.stderr)[-2000:]}")


async def run_server(
    w: Workload,
    system: System,
    dsn: str,
    root: str,
    fake: FakeTelegram,
    processes: int,
    logs: Path,
    profile: Path | None = None,
) -> dict[str, Any]:
    env = deployed_env(dsn, root) | dict(system.env)
    command: list[str] = ["node", str(GRAMMY / "bot.js")]
    cwd = None
    if system.kind != "grammy":
        cwd, python = checkout_of(system)
        app = "two_sessions:build_bot" if system.kind == "bot2" else None
        command = web_command(cwd, python, app)
        env["PYTHONPATH"] = checkout_path(cwd, env)
    name = re.sub(r"[^\w.=-]+", "_", system.label)
    bots = [
        BotProcess(env, logs / f"{w.name}-{name}-{i}.log", command=command, cwd=cwd) for i in range(processes)
    ]
    try:
        for bot in bots:
            bot.wait_ready()
        pids = [bot.proc.pid for bot in bots]
        urls = [bot.url + "/webhook" for bot in bots]
        turn = iter(range(10**9))
        updates, expected = make_updates(w)
        handled = sum(expected.chats.values())  # updates a handler takes: the 🍕 ones
        client = LoopbackHttp()
        try:
            for url in urls:  # as many connections as requests in flight (a redelivery overlaps its first)
                await client.open(url, w.in_flight * (2 if w.duplicate_share else 1))
            spies = []
            if profile is not None and system.kind != "grammy":
                # py-spy attached for the load only: start-up and the /hunger check stay out of it.
                for n, pid in enumerate(pids):
                    out = profile / f"{w.name}-{name}-{n}.txt"
                    spy = (PY_SPY, "record", "--pid", str(pid), "--rate", "1000", "--format", "raw")
                    spies.append(
                        await asyncio.create_subprocess_exec(
                            *spy, "--nonblocking", "-o", str(out), stdout=DEVNULL, stderr=DEVNULL
                        )
                    )
                await asyncio.sleep(1.0)  # py-spy attaches
            db = await database_server(dsn)
            cpu_before, db_before, load_before = cpu_seconds(pids), cpu_seconds(db), time.process_time()
            stats: DeliveryStats = await deliver(
                client,
                lambda: urls[next(turn) % len(urls)],
                SECRET,
                updates,
                in_flight=w.in_flight,
                one_per_chat=w.one_per_chat,
                duplicate_share=w.duplicate_share,
                give_up_after=600,
            )
            cpu = cpu_seconds(pids) - cpu_before
            db_cpu = cpu_seconds(db) - db_before if db else None
            load_cpu = time.process_time() - load_before
            for running in spies:  # py-spy writes its file when it stops
                running.send_signal(signal.SIGINT)
                await running.wait()
            runs = await handler_runs(client, urls, fake) if system.kind == "bot2" else None
            lost, extra = await verify(client, urls[0], fake, expected, per_user=system.kind == "bot2")
            rss = peak_rss_mb(pids)
        finally:
            await client.aclose()
    finally:
        for bot in bots:
            bot.close()
    return {
        "workload": w.name,
        "system": system.label,
        "updates": len(updates),
        "updates/s": round(stats.delivered / stats.elapsed),
        "p50 ms": ms(stats.percentile(50)),
        "p99 ms": ms(stats.percentile(99)),
        "redelivered": stats.redelivered,
        "non-2xx": sum(n for code, n in stats.statuses.items() if not 200 <= code < 300),
        "lost": lost,
        "extra": extra,
        "CPU µs/update": round(cpu / stats.delivered * 1e6),
        "DB CPU µs/update": per_update_us(db_cpu, stats.delivered),
        "load CPU µs/update": per_update_us(load_cpu, stats.delivered),
        "peak RSS MB": f"{rss:.0f}",
        "runs/handled": "-" if runs is None else f"{runs / handled:.3f}",
    }


async def raw_postgres(w: Workload, dsn: str) -> dict[str, Any]:
    """What one update needs, straight on asyncpg: no HTTP, no framework. The ceiling for our numbers."""
    updates, _ = make_updates(w)
    pool = await asyncpg.create_pool(dsn, min_size=min(w.in_flight, 16), max_size=16)
    gate = asyncio.Semaphore(w.in_flight)
    latencies: list[float] = []

    async def one(built: Update) -> None:
        update = built.json()
        message = update["message"]
        async with gate, pool.acquire() as conn:
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO processed_updates (bot_id, update_id) VALUES (1, $1) ON CONFLICT DO NOTHING",
                    update["update_id"],
                )
                key = str(message["chat"]["id"])
                row = await conn.fetchrow("SELECT data FROM sessions WHERE key = $1 FOR UPDATE", key)
                if row is None:
                    await conn.execute(
                        "INSERT INTO sessions (key, data) VALUES ($1, '{\"pizza_count\": 0}') ON CONFLICT DO NOTHING",
                        key,
                    )
                    await conn.fetchrow("SELECT data FROM sessions WHERE key = $1 FOR UPDATE", key)
                if PIZZA in message["text"]:
                    await conn.execute(
                        "UPDATE sessions SET data = jsonb_set(data, '{pizza_count}',"
                        " to_jsonb((data->>'pizza_count')::int + 1)) WHERE key = $1",
                        key,
                    )
            latencies.append(time.perf_counter() - started)

    db = await database_server(dsn)
    db_before, cpu_before = cpu_seconds(db), time.process_time()
    started = time.perf_counter()
    try:
        await asyncio.gather(*(one(u) for u in updates))
    finally:
        await pool.close()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before  # the loop is this process: its CPU is the system's
    db_cpu = cpu_seconds(db) - db_before if db else None
    latencies.sort()
    return {
        "workload": w.name,
        "system": System("raw").label,
        "updates": len(updates),
        "updates/s": round(len(updates) / elapsed),
        "p50 ms": ms(statistics.median(latencies)),
        "p99 ms": ms(latencies[int(0.99 * (len(latencies) - 1))]),
        "redelivered": "-",
        "non-2xx": "-",
        "lost": "-",
        "extra": "-",
        "CPU µs/update": per_update_us(cpu, len(updates)),
        "DB CPU µs/update": per_update_us(db_cpu, len(updates)),
        "load CPU µs/update": "-",
        "peak RSS MB": "-",
        "runs/handled": "-",
    }


async def admin(dsn: str, query: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(query)
    finally:
        await conn.close()


def with_database(url: str, database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path="/" + database))


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[str, str]]:
    """DATABASE_URL's server, or a throwaway embedded one stopped at the end; and which of the two."""
    url = os.environ.get("DATABASE_URL")
    if url is not None:
        yield url, "from DATABASE_URL"
        return
    embedded = EmbeddedPostgres.throwaway()
    try:
        yield embedded.dsn("postgres"), "embedded"
    finally:
        embedded.stop()


@contextlib.asynccontextmanager
async def new_database(server_url: str) -> AsyncIterator[str]:
    """An empty database of its own on that server (its DSN), dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    await admin(server_url, f"CREATE DATABASE {name}")
    try:
        yield with_database(server_url, name)
    finally:
        await admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def fresh_database(server_url: str) -> str:
    """A new database migrated by this checkout's code, kept (for scripts that run one system)."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    await admin(server_url, f"CREATE DATABASE {name}")
    dsn = with_database(server_url, name)
    await migrate(dsn)
    return dsn


def table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()}"


def rss_mb(pids: list[int]) -> float:
    """Current resident memory of the largest of these processes (or their descendants)."""
    largest = 0
    for pid in {p for root in pids for p in _tree(root)}:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    largest = max(largest, int(line.split()[1]))
    return largest / 1024


SOAK_CHATS = 20_000


async def soak(seconds: float, rate: float, dsn: str, root: str, logs: Path) -> None:
    """Telegram-like traffic (at most one update per chat in flight) at a fixed rate for `seconds`,
    printing the bot's resident memory every 30 s: it must stay flat. SOAK_CHATS chats, more than the
    sessions a process remembers (SESSION_CACHE, 5,000): that memory is full, and evicting, all along."""
    env = deployed_env(dsn, root)
    bot = BotProcess(env, logs / "soak.log", command=web_command(ROOT, sys.executable, None), cwd=ROOT)
    client = LoopbackHttp()
    try:
        bot.wait_ready()
        url = bot.url + "/webhook"
        started = time.monotonic()
        sent, samples = 0, []
        next_sample = started
        while (now := time.monotonic()) < started + seconds:
            if now >= next_sample:
                samples.append((round(now - started), f"{rss_mb([bot.proc.pid]):.1f}"))
                print(f"{samples[-1][0]:>5} s  {sent:>8} updates  RSS {samples[-1][1]} MB", file=sys.stderr)
                next_sample += 30
            # One second's worth of updates, each chat at most once: Telegram's shape.
            batch = [
                message_update(
                    sent + i + 1, -100_000 - (sent + i) % SOAK_CHATS, f"{PIZZA} again" if i % 2 else "hi"
                )
                for i in range(int(rate))
            ]
            tick = time.monotonic()
            await deliver(client, lambda: url, SECRET, batch, in_flight=40, one_per_chat=True)
            sent += len(batch)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        samples.append((round(time.monotonic() - started), f"{rss_mb([bot.proc.pid]):.1f}"))
        print(f"soak: {sent} updates in {seconds:.0f} s at {rate:g}/s; RSS MB over time: {samples}")
    finally:
        await client.aclose()
        bot.close()


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload and system, the run with the median rate (the lower one of an even count)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["workload"], row["system"]), []).append(row)
    return [sorted(runs, key=lambda r: r["updates/s"])[(len(runs) - 1) // 2] for runs in groups.values()]


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-w", "--workloads", default="A,B,C,T,G")
    parser.add_argument(
        "-s",
        "--systems",
        default="bot,grammy,raw",
        help="what to measure side by side: bot, bot2 (two sessions), bot@DIR (another checkout's code), "
        "bot+NAME=VALUE+... (a setting), grammy, raw",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: a tenth of every workload")
    parser.add_argument(
        "-p", "--processes", type=int, default=1, help="server processes sharing the database"
    )
    parser.add_argument("-r", "--repeat", type=int, default=1, help="runs of each; the median is reported")
    parser.add_argument(
        "--profile",
        type=Path,
        help="run our bot under py-spy (pip install py-spy) and write collapsed stacks to this folder",
    )
    parser.add_argument("--soak", type=float, help="instead: Telegram-like traffic for this many seconds")
    parser.add_argument("--rate", type=float, default=500, help="updates per second during --soak")
    args = parser.parse_args()
    chosen = [WORKLOADS[name.strip()] for name in args.workloads.split(",")]
    if args.quick:
        chosen = [w.quick() for w in chosen]
    systems = [System.parse(text) for text in args.systems.split(",")]
    # The servers inherit this environment: none of the bot's own settings may come from it, or "defaults"
    # would be whatever this shell has (DATABASE_URL is read by postgres_server, and set for each server).
    for name in sorted(bot_settings() & os.environ.keys()):
        if name != "DATABASE_URL":
            print(
                f"{name} from this environment is not passed on: the servers run with defaults",
                file=sys.stderr,
            )
            del os.environ[name]
    if any(s.kind == "grammy" for s in systems) and (why := grammy_ready()) is not None:
        print(why, file=sys.stderr)
        systems = [s for s in systems if s.kind != "grammy"]

    logs = Path(tempfile.mkdtemp(prefix="pizza-bench-"))
    fake = FakeTelegram(username=USERNAME)
    rows: list[dict[str, Any]] = []
    with postgres_server() as (server_url, where), serve(fake) as root:
        if args.soak:
            await soak(args.soak, args.rate, await fresh_database(server_url), root, logs)
            return
        for w in chosen:
            for run in range(args.repeat):
                # Each run starts with another system, so none always gets the quieter moment.
                for system in systems[run % len(systems) :] + systems[: run % len(systems)]:
                    # A database per row, migrated by the code that runs on it: old and new checkouts'
                    # migrations never meet, and no row starts on another's sessions.
                    async with new_database(server_url) as dsn:
                        if system.kind in ("bot", "bot2"):
                            release(system, dsn, root, logs)
                        else:
                            await migrate(dsn)
                        if system.kind == "raw":
                            row = await raw_postgres(w, dsn)
                        else:
                            row = await run_server(
                                w, system, dsn, root, fake, args.processes, logs, args.profile
                            )
                    row["load"] = f"{os.getloadavg()[0]:.1f}"
                    rows.append(row)
                    print(table(rows[-1:]), file=sys.stderr, flush=True)
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, {machine()}, {args.processes} server process(es) each, "
        f"PostgreSQL {where}, median of {args.repeat} run(s); "
        "load = 1-minute load average after the row\n"
    )
    print(table(median_rows(rows)))


if __name__ == "__main__":
    # A stopped benchmark still stops its servers and its database (the finally blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    asyncio.run(main())
