"""The command line as a PaaS and a developer use it: real processes, real exit codes, one-line errors."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bot.app import SECRET_HEADER
from bot.migrate import MIGRATIONS_DIR
from bot.testing.env import TOKEN, bot_env
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import BotProcess, free_port
from bot.testing.updates import PIZZA, callback_update, encode, hunger, message_update

TODO_APP = "examples.todo:build_bot"


def bot(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BOT_TOKEN", "WEBHOOK_SECRET")}
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BOT_TOKEN": "nope"}, "BOT_TOKEN: not a bot token"),
        ({"BOT_TOKEN": TOKEN}, "WEBHOOK_SECRET: required when BOT_TOKEN is set"),
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
        ("bot.apps.pizza:PIZZA", "gave a str, not a bot.dispatch.Bot"),
    ],
)
def test_an_app_that_does_not_load_is_one_line(
    telegram_root: str, database_url: str, app: str, message: str
) -> None:
    result = bot("serve", "--app", app, env=bot_env(database_url, telegram_root))
    assert result.returncode == 1
    assert result.stderr.startswith(f"bot: --app: '{app}': {message}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_set_webhook_without_a_url_names_the_variable(telegram_root: str, database_url: str) -> None:
    result = bot("set-webhook", env=bot_env(database_url, telegram_root))
    assert result.returncode == 1
    assert result.stderr.startswith("bot: WEBHOOK_URL: required")


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
        process.send_signal(signal.SIGINT)
        process.wait(20)
        log.close()


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
        process.send_signal(signal.SIGINT)
        process.wait(20)
        log.close()


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
    assert result.returncode == 0
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
            assert "privacy mode is on for @" in process.output()
            assert "/setprivacy" in process.output()
    finally:
        fake.privacy = False
