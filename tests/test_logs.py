"""Logs: JSON per line or readable text, one line per update, and never a secret in any line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.app import SECRET_HEADER
from bot.apps.pizza import build_bot
from bot.apps.pizza_testing import PIZZA, hunger
from bot.config import load_settings
from bot.context import BotIdentity
from bot.logs import (
    JsonFormatter,
    LinesPerSecond,
    LineWriter,
    TextFormatter,
    log_update,
    secrets_of,
    setup_logging,
)
from bot.metrics import Metrics
from bot.pipeline import Pipeline
from bot.storage.memory import MemoryStorage
from bot.telegram import decode_update
from bot.testing.env import SECRET, TOKEN, bot_env, make_settings
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import BotProcess, free_port
from bot.testing.updates import encode, message_update

PASSWORD = "db-pass-w0rd-9f8e7d"
JSON_KEYS = {"time", "level", "logger", "message"}


def record(message: str, *, exc: BaseException | None = None, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("bot.test", logging.WARNING, __file__, 1, message, (), None)
    if exc is not None:
        rec.exc_info = (type(exc), exc, exc.__traceback__)
    rec.__dict__.update(extra)
    return rec


def test_a_json_line_has_the_fields_and_the_update_context() -> None:
    line = JsonFormatter([]).format(
        record("update 5: applied", update_id=5, chat=-100, outcome="applied", duration=0.0021)
    )
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["level"] == "WARNING" and parsed["logger"] == "bot.test"
    assert parsed["message"] == "update 5: applied"
    assert (parsed["update_id"], parsed["chat"], parsed["outcome"], parsed["duration"]) == (
        5,
        -100,
        "applied",
        0.0021,
    )
    assert parsed["time"].endswith("Z")


def test_a_traceback_stays_inside_its_json_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError as exc:
        line = JsonFormatter([]).format(record("it broke", exc=exc))
    assert "\n" not in line
    assert "ValueError: bad\nthing" in json.loads(line)["error"]


@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter])
def test_secrets_are_replaced_in_messages_and_tracebacks(formatter: type[JsonFormatter]) -> None:
    try:
        raise ConnectionError(f"https://api.telegram.org/bot{TOKEN}/sendMessage failed")
    except ConnectionError as exc:
        line = formatter([TOKEN, SECRET, PASSWORD]).format(
            record(f"dsn postgres://u:{PASSWORD}@h/db secret {SECRET}", exc=exc)
        )
    for secret in (TOKEN, SECRET, PASSWORD):
        assert secret not in line
    assert "***" in line


@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter])
def test_the_direct_url_password_and_pgpassword_are_never_written(formatter: type[JsonFormatter]) -> None:
    direct, pgpassword = "direct-pass-0a1b2c", 'pg"pass\\word-3d4e'  # "any characters will do" (README)
    settings = load_settings(
        {
            "DATABASE_URL": "postgresql://u@pooler/db",
            "DATABASE_DIRECT_URL": f"postgresql://u:{direct}@db/db",
            "PGPASSWORD": pgpassword,
        }
    )
    line = formatter(secrets_of(settings)).format(
        record(f"migrate: postgresql://u:{direct}@db/db refused password {pgpassword}")
    )
    assert direct not in line and pgpassword not in line
    assert json.dumps(pgpassword)[1:-1] not in line  # nor as a JSON line writes it
    assert "***" in line


@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter])
def test_a_percent_encoded_database_password_is_masked_decoded_too(formatter: type[JsonFormatter]) -> None:
    # A URL holds `p@ss"w/rd` as p%40ss%22w%2Frd; asyncpg and PostgreSQL use it decoded, and their errors
    # and a repr of the connection's arguments write it so. A short one too, where it stands as a value.
    settings = load_settings(
        {
            "DATABASE_URL": "postgresql://u:p%40ss%22w%2Frd-6b7c@pooler/db",
            "DATABASE_DIRECT_URL": "postgresql://u:a%40b@db/db",
        }
    )
    line = formatter(secrets_of(settings)).format(
        record(
            "connect failed: postgresql://u:p%40ss%22w%2Frd-6b7c@pooler/db {'password': 'p@ss\"w/rd-6b7c'}"
            " password authentication failed, password=a@b"
        )
    )
    for leaked in ('p@ss"w/rd-6b7c', json.dumps('p@ss"w/rd-6b7c')[1:-1], "p%40ss%22w%2Frd-6b7c", "a@b"):
        assert leaked not in line
    assert "password=***" in line.replace('\\"', '"')


@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter])
def test_the_metrics_token_is_never_written(formatter: type[JsonFormatter]) -> None:
    metrics_token = "metrics-token-5f6a7b8c9d"  # it guards /metrics: a request's header may reach a line
    settings = load_settings({"METRICS_TOKEN": metrics_token})
    line = formatter(secrets_of(settings)).format(
        record(f"GET /metrics, Authorization: Bearer {metrics_token}")
    )
    assert metrics_token not in line and "Bearer ***" in line


@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter])
def test_a_short_secret_is_masked_where_it_stands_as_a_value_not_in_every_word(
    formatter: type[JsonFormatter],
) -> None:
    settings = load_settings(
        {"BOT_TOKEN": TOKEN, "WEBHOOK_SECRET": "s", "DATABASE_URL": "postgresql://bot:bot@db/bot"}
    )
    message = (
        "update 5: applied in 3.1 ms by bot.pipeline; postgresql://bot:bot@db/bot, secret_token=s,"
        " {'X-Telegram-Bot-Api-Secret-Token': 's'}, PGPASSWORD=bot"
    )
    masked = (
        "update 5: applied in 3.1 ms by bot.pipeline; postgresql://bot:***@db/bot, secret_token=***,"
        " {'X-Telegram-Bot-Api-Secret-Token': '***'}, PGPASSWORD=***"
    )
    line = formatter(secrets_of(settings)).format(record(message))
    assert masked in (json.loads(line)["message"] if formatter is JsonFormatter else line)
    json_quoted = formatter(["s"]).format(record('{"secret_token": "s", "status": "ok"}'))
    assert '"secret_token": "***", "status": "ok"' in json_quoted.replace('\\"', '"')


def test_a_text_line_is_what_the_standard_formatter_writes() -> None:
    standard = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for created in (1_764_674_957.838, 1_764_674_957.0004, 1_764_674_958.9999):
        rec = record("update %d: %s in %.1f ms")
        rec.args, rec.created, rec.msecs = (85, "applied", 3.14), created, (created - int(created)) * 1000
        assert TextFormatter([]).format(rec) == standard.format(rec)
    try:
        raise ValueError("bad")
    except ValueError as exc:
        failed = record("it broke", exc=exc)
    assert TextFormatter([]).format(failed) == standard.format(failed)


class Stream(io.StringIO):
    """A stream that counts its writes."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def info(n: int, message: str = "update %d", *args: object) -> logging.LogRecord:
    return logging.LogRecord("bot.test", logging.INFO, __file__, 1, message, (n, *args), None)


def test_a_busy_process_writes_its_lines_in_order_in_few_writes() -> None:
    stream = Stream()
    writer = LineWriter(stream, interval=0.2)
    writer.setFormatter(logging.Formatter("%(message)s"))
    try:
        for n in range(1000):
            writer.handle(info(n))
        deadline = time.monotonic() + 5
        while stream.getvalue().count("\n") < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)  # the writer's thread writes them without a flush
        assert stream.getvalue().splitlines() == [f"update {n}" for n in range(1000)]
        assert stream.writes <= 3  # the first line at once (the handler was quiet), the rest together
    finally:
        writer.close()


def test_a_quiet_process_and_a_warning_are_written_at_once() -> None:
    stream = Stream()
    writer = LineWriter(stream, interval=60)  # the thread would not write them within the test
    writer.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    try:
        writer.handle(info(1))
        assert stream.getvalue() == "INFO update 1\n"
        writer.handle(info(2))  # busy now: queued
        warning = info(3)
        warning.levelno, warning.levelname = logging.WARNING, "WARNING"
        writer.handle(warning)
        assert stream.getvalue().splitlines() == ["INFO update 1", "INFO update 2", "WARNING update 3"]
    finally:
        writer.close()


def test_a_line_shows_its_arguments_as_they_were_when_it_was_logged() -> None:
    stream = Stream()
    writer = LineWriter(stream, interval=60)
    writer.setFormatter(logging.Formatter("%(message)s"))
    try:
        writer.handle(info(1))
        changing = ["before"]
        writer.handle(info(2, "update %d: %s", changing))
        changing[0] = "after"
        writer.flush()
        assert stream.getvalue().splitlines() == ["update 1", "update 2: ['before']"]
    finally:
        writer.close()


def _stderr_of(body: str) -> list[str]:
    """The lines a fresh interpreter writes to stderr running `body` with `serve`'s logging set up
    (`log` is a logger of ours)."""
    script = (
        "import logging, os, sys\n"
        "from bot.logs import setup_logging\n"
        "from bot.testing.env import make_settings\n"
        "setup_logging(make_settings('postgresql://u@h/db', 'http://127.0.0.1:1'))\n"
        "log = logging.getLogger('bot.test')\n" + body
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def test_lines_queued_at_exit_are_written(tmp_path: Path) -> None:
    """A process that logs and ends at once (its writer's thread not yet awake) loses no line."""
    lines = _stderr_of("for n in range(2000):\n    log.info('update %d', n)\n")
    assert [line.rsplit(" ", 1)[-1] for line in lines] == [str(n) for n in range(2000)]


def test_a_forked_worker_writes_its_lines_too() -> None:
    """WEB_CONCURRENCY forks workers after logging is set up: each needs a writer thread of its own, and
    writes what it queued before it leaves (os._exit, after logging.shutdown, as bot.server does)."""
    lines = _stderr_of(
        "for n in range(500):\n"
        "    log.info('parent %d', n)\n"
        "children = []\n"
        "for c in range(2):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        for n in range(500):\n"
        "            log.info('child%d %d', c, n)\n"
        "        logging.shutdown()\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "for pid in children:\n"
        "    os.waitpid(pid, 0)\n"
    )
    messages = [line.split(": ", 1)[1] for line in lines]
    for who in ("parent", "child0", "child1"):
        assert [m for m in messages if m.startswith(who + " ")] == [f"{who} {n}" for n in range(500)]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter])
def test_an_update_line_queued_as_its_parts_is_the_line_its_record_would_give(
    formatter: type[JsonFormatter], monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = Stream()
    writer = LineWriter(stream, interval=60)
    writer.setFormatter(formatter(["s3cret"]))
    root = logging.getLogger()
    root.handlers[:] = [writer]
    root.setLevel(logging.INFO)
    logger = logging.getLogger("bot.test_lines")
    records = []
    make = logger.makeRecord
    monkeypatch.setattr(logger, "makeRecord", lambda *a, **k: records.append(a) or make(*a, **k))

    log_update(logger, 7, -3, "applied", 0.00213)  # only the writer would see it: no record made
    assert records == []
    seen = Stream()
    other = logging.StreamHandler(seen)
    logger.addHandler(other)  # another handler: a record, which both see
    log_update(logger, 7, -3, "applied", 0.00213)
    logger.removeHandler(other)
    assert len(records) == 1 and seen.getvalue() == "update 7: applied in 2.1 ms\n"
    writer.close()

    first, second = stream.getvalue().splitlines()
    if formatter is JsonFormatter:
        parsed = [json.loads(line) for line in (first, second)]
        assert parsed[0].pop("time")[:4] == parsed[1].pop("time")[:4] == time.strftime("%Y")
        assert parsed[0] == parsed[1]
        assert parsed[0]["duration"] == 0.00213 and parsed[0]["chat"] == -3
    else:
        assert (
            first.split(" ", 2)[2]
            == second.split(" ", 2)[2]
            == "INFO bot.test_lines: update 7: applied in 2.1 ms"
        )


class Lines(logging.Handler):
    """The messages a logger's records would write, in order."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.messages: list[str] = []
        logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def update_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("bot.test_update_lines")
    yield logger
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)


def log(lines: LinesPerSecond, update_id: int, outcome: str = "applied") -> None:
    """An update's line, as the pipeline writes it."""
    if lines.allow(outcome):
        log_update(lines.logger, update_id, -1, outcome, 0.001)


def test_at_info_a_busy_second_writes_its_first_update_lines_then_counts_the_rest(
    update_logger: logging.Logger,
) -> None:
    update_logger.setLevel(logging.INFO)
    seen = Lines(update_logger)
    now = [100.2]
    lines = LinesPerSecond(update_logger, "update", per_second=3, clock=lambda: now[0])
    for n in range(8):  # second 100: three lines, five counted
        log(lines, n, "ignored" if n % 4 == 3 else "applied")
    assert seen.messages == [f"update {n}: applied in 1.0 ms" for n in range(3)]
    now[0] = 101.0
    log(lines, 8)  # the next second's first update writes the last one's count first
    log(lines, 9)
    assert seen.messages[3:] == [
        "update lines: 5 more this second: 3 applied, 2 ignored (LOG_LEVEL=DEBUG writes one for each)",
        "update 8: applied in 1.0 ms",
        "update 9: applied in 1.0 ms",
    ]
    lines.flush()  # nothing counted in second 101
    assert len(seen.messages) == 6


def test_at_debug_every_update_gets_its_line(update_logger: logging.Logger) -> None:
    update_logger.setLevel(logging.DEBUG)
    seen = Lines(update_logger)
    lines = LinesPerSecond(update_logger, "update", per_second=3, clock=lambda: 100.5)
    for n in range(8):
        log(lines, n)
    lines.flush()
    assert seen.messages == [f"update {n}: applied in 1.0 ms" for n in range(8)]


@pytest.mark.anyio
async def test_the_count_of_a_busy_second_is_written_when_no_update_follows(
    update_logger: logging.Logger,
) -> None:
    update_logger.setLevel(logging.INFO)
    seen = Lines(update_logger)
    # The monotonic clock moved to the middle of a second: the three lines fall in one second. (On the
    # clock itself a second could end between the second and the third, whose own line then came last,
    # after the count, and no count followed it.)
    shift = time.monotonic() % 1 - 0.5
    lines = LinesPerSecond(update_logger, "update", per_second=1, clock=lambda: time.monotonic() - shift)
    for n in range(3):
        log(lines, n)
    await anyio.sleep(1.2)  # the loop's timer, at the end of the clock's second (in 0.5 s)
    assert seen.messages[-1] == (
        "update lines: 2 more this second: 2 applied (LOG_LEVEL=DEBUG writes one for each)"
    )


@pytest.mark.anyio
@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(("level", "lines"), [("INFO", 1), ("WARNING", 0)])
async def test_one_line_per_update_at_info_none_at_warning(
    capsys: pytest.CaptureFixture[str], level: str, lines: int
) -> None:
    setup_logging(
        make_settings("postgresql://u@h/db", "http://127.0.0.1:1", LOG_FORMAT="json", LOG_LEVEL=level)
    )
    pipeline = Pipeline(build_bot(), MemoryStorage(), BotIdentity(1, "pizza_test_bot"), Metrics())
    await pipeline.process(decode_update(encode(message_update(9, -3, PIZZA))))
    logging.getLogger().handlers[0].flush()
    written = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    per_update = [w for w in written if w.get("update_id") == 9]
    assert len(per_update) == lines
    if lines:
        assert per_update[0]["chat"] == -3 and per_update[0]["outcome"] == "applied"
        assert per_update[0]["duration"] >= 0


@pytest.mark.anyio
@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_a_busy_pipeline_writes_every_update_line_at_debug_and_a_count_of_most_at_info(
    capsys: pytest.CaptureFixture[str], level: str
) -> None:
    setup_logging(
        make_settings("postgresql://u@h/db", "http://127.0.0.1:1", LOG_FORMAT="json", LOG_LEVEL=level)
    )
    pipeline = Pipeline(build_bot(), MemoryStorage(), BotIdentity(1, "pizza_test_bot"), Metrics())
    for n in range(60):
        await pipeline.process(decode_update(encode(message_update(100 + n, -3, PIZZA))))
    pipeline.update_lines.flush()
    logging.getLogger().handlers[0].flush()
    written = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    per_update = [w for w in written if "update_id" in w]
    counted = [int(w["message"].split()[2]) for w in written if w["message"].startswith("update lines: ")]
    assert len(per_update) + sum(counted) == 60  # every update: a line of its own or a count
    if level == "DEBUG":
        assert len(per_update) == 60
    else:  # 60 updates take a second or two here: at most 10 lines in each second they touch
        assert len(per_update) <= 30 and counted


# --- a real process ---------------------------------------------------------------------------------


async def _user_with_password(database_url: str) -> str:
    """The test database, reached as a user with a password (which must then never be written)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            f"DROP ROLE IF EXISTS pizza_logs; CREATE ROLE pizza_logs LOGIN SUPERUSER PASSWORD '{PASSWORD}'"
        )
    finally:
        await conn.close()
    scheme, rest = database_url.split("://", 1)
    return f"{scheme}://pizza_logs:{PASSWORD}@{rest.split('@', 1)[1]}"


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_serve_process_writes_json_lines_and_no_secret_under_traffic_faults_and_bad_input(
    database_url: str, telegram_root: str, fake: FakeTelegram, tmp_path: Path
) -> None:
    url = await _user_with_password(database_url)
    metrics_port = free_port()
    # The cut below can land while a reply's retry holds its lease: the sweeper sends it again once the
    # lease runs out, which by default (60 s) is past the wait for the replies.
    env = bot_env(
        url,
        telegram_root,
        LOG_FORMAT="json",
        METRICS_PORT=str(metrics_port),
        OUTBOX_SWEEP_INTERVAL="0.1",
        BOT_API_TIMEOUT="5",
        OUTBOX_LEASE="10",
    )
    seen: list[str] = []  # every response the process gave, headers and body
    with BotProcess(env, tmp_path / "bot.log") as bot:
        bot.wait_ready()

        async with httpx.AsyncClient(timeout=10) as client:

            async def post(body: bytes, secret: str = SECRET) -> int:
                headers = {SECRET_HEADER: secret, "content-type": "application/json"}
                answer = await client.post(bot.url + "/webhook", content=body, headers=headers)
                seen.append(f"{answer.headers}\n{answer.text}")
                return answer.status_code

            fake.fail_next("sendMessage", error_code=500, chat_id=-21)
            fake.fail_next(
                "sendMessage", error_code=429, description="Too Many Requests", retry_after=1, chat_id=-22
            )
            fake.fail_next(
                "sendMessage", error_code=403, description="Forbidden: bot was kicked", chat_id=-23
            )
            for n, chat in enumerate((-21, -22, -23, -24)):
                assert await post(encode(message_update(10 + n, chat, PIZZA))) == 200
                assert await post(encode(hunger(20 + n, chat))) == 200
            assert await post(encode(hunger(20, -21))) == 200  # a redelivery
            assert await post(encode(hunger(30, -25)), secret="wrong") == 401
            # Bad input; which 4xx each gets is tested elsewhere (test_app, test_server).
            for bad in (b"{not json", b"[" * 100_000, b"x" * (2 * 1024 * 1024)):
                # The server may close the connection on an oversized body before reading it all.
                with contextlib.suppress(httpx.HTTPError):
                    assert 400 <= await post(bad) < 500
            for path in ("/", f"/bot{TOKEN}/getMe", "/metrics", f"/webhook?token={TOKEN}"):
                answer = await client.get(bot.url + path)
                seen.append(f"{answer.headers}\n{answer.text}")
                assert answer.status_code in (404, 405)
            # A database fault mid-traffic: every connection of the bot is cut.
            conn = await asyncpg.connect(database_url)
            try:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pizza-bot'"
                )
            finally:
                await conn.close()
            for n in range(5):
                await post(encode(message_update(40 + n, -26, PIZZA)))
            # And -23's call made, refused for good (403), which the process logs as "failed" once it
            # has the answer: a shutdown waits for a call in flight. (Not waited for, it could still be
            # queued, or leased by a sender the cut stopped, when the process was told to end.)
            await fake.wait_for_async(
                lambda: (
                    {c.params["chat_id"] for c in fake.delivered()} >= {-21, -22, -24}
                    and bool(fake.sent_messages(-23))
                ),
                30,
            )

            on_metrics_port = f"http://127.0.0.1:{metrics_port}"
            scraped = await client.get(on_metrics_port + "/metrics")
            assert scraped.status_code == 200
            families = {f.name for f in text_string_to_metric_families(scraped.text)}
            assert {"bot_updates", "bot_api_calls", "bot_outbox_unsent"} <= families
            assert (await client.post(on_metrics_port + "/webhook", content=b"{}")).status_code == 404
            seen.append(scraped.text)
        bot.terminate()
        output = bot.output()

    lines = output.splitlines()
    assert lines, "the process wrote nothing"
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    for entry in parsed:
        assert entry.keys() >= JSON_KEYS
    assert any(e["logger"].startswith("uvicorn") for e in parsed)  # uvicorn's lines too
    per_update = {e["update_id"]: e for e in parsed if "duration" in e and "update_id" in e}
    assert {10, 11, 12, 13, 20, 21, 22, 23} <= per_update.keys()
    assert per_update[20]["outcome"] in ("applied", "duplicate") and per_update[20]["chat"] == -21
    outcomes = {e.get("outcome") for e in parsed}
    assert {"applied", "duplicate", "retry", "rate_limited", "failed"} <= outcomes
    everything = output + "\n".join(seen)
    for secret in (TOKEN, SECRET, PASSWORD):
        assert secret not in everything
    print(f"{len(lines)} log lines, {len(seen)} responses checked", file=sys.stderr)
