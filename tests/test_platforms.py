"""Each platform's run, simulated here: its commands read from its own file (Procfile, render.yaml,
deploy/fly.toml), run by a shell from the checkout as the platform runs them, with the environment the
platform sets, against a real PostgreSQL and the fake Bot API. No PaaS is reachable from this machine;
what differs is the platform's own router and TLS in front of the port.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bot.embedded import POSTGRES_BIN_PATH
from bot.testing.env import TOKEN, bot_env
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import BotProcess, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PROCFILE = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
RENDER = next(s for s in yaml.safe_load((ROOT / "render.yaml").read_text())["services"] if s["type"] == "web")
FLY = tomllib.loads((ROOT / "deploy" / "fly.toml").read_text())
# `python` on the platform's PATH is the one the build installed requirements.txt into: here, this venv's.
PATH = f"{Path(sys.executable).parent}:/usr/bin:/bin"


def platform_env(database_url: str, telegram_root: str, **platform: str) -> dict[str, str]:
    """The operator's settings (no WEBHOOK_URL: the platform's files say to leave it empty) and what the
    platform sets itself."""
    env = {k: v for k, v in bot_env(database_url, telegram_root).items() if k != "WEBHOOK_URL"}
    return {**env, "PATH": PATH, **platform}


def run_once(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A release phase / pre-deploy command: to completion, in the checkout, through a shell."""
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WEBHOOK_URL", "PATH")}
    return subprocess.run(
        ["sh", "-c", command], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def register_elsewhere(telegram_root: str, url: str) -> None:
    """Another deployment of the same bot token registered its webhook first."""
    response = httpx.post(f"{telegram_root}/bot{TOKEN}/setWebhook", json={"url": url}).json()
    assert response["ok"], response


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[BotProcess]]:
    processes: list[BotProcess] = []
    yield processes
    for process in processes:
        process.close()


def web(command: str, env: dict[str, str], log: Path, started: list[BotProcess]) -> BotProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WEBHOOK_URL")}
    process = BotProcess({**clean, **env}, log, command=["sh", "-c", command])
    started.append(process)
    return process


# --- Heroku: the Procfile's roles, with what the dyno and the Python buildpack set ----------------------


def heroku_env(database_url: str, telegram_root: str, **extra: str) -> dict[str, str]:
    # A Basic dyno: the buildpack's .profile.d script sets WEB_CONCURRENCY=2 and says it did.
    return platform_env(
        database_url,
        telegram_root,
        DYNO="web.1",
        WEB_CONCURRENCY="2",
        WEB_CONCURRENCY_SET_BY="heroku/python",
        DB_POOLER="auto",  # app.json's value
        **extra,
    )


def test_heroku_deploy_button_without_dyno_metadata_stops_at_start_saying_what_to_do(
    empty_database_url: str, telegram_root: str, fake: FakeTelegram, tmp_path: Path, started: list[BotProcess]
) -> None:
    """app.json leaves WEBHOOK_URL empty, and the dyno knows its address only with the runtime dyno
    metadata lab on: the bot used to serve, healthy, receiving nothing."""
    env = heroku_env(empty_database_url, telegram_root)
    release = run_once(PROCFILE["release"], env)
    assert release.returncode == 0, release.stderr
    process = web(PROCFILE["web"], env, tmp_path / "web.log", started)
    assert process.proc.wait(60) == 1
    [line] = [line for line in process.output().splitlines() if line.startswith("bot: ")]
    assert line.startswith("bot: WEBHOOK_URL: not set, nor a platform variable to derive it from")
    assert "heroku labs:enable runtime-dyno-metadata" in line
    assert fake.webhook == {}


def test_heroku_with_dyno_metadata_registers_its_domain_and_serves_in_one_process(
    empty_database_url: str, telegram_root: str, fake: FakeTelegram, tmp_path: Path, started: list[BotProcess]
) -> None:
    env = heroku_env(
        empty_database_url, telegram_root, HEROKU_APP_DEFAULT_DOMAIN_NAME="pizza-1a2b3c.herokuapp.com"
    )
    assert run_once(PROCFILE["release"], env).returncode == 0
    process = web(PROCFILE["web"], env, tmp_path / "web.log", started)
    process.wait_ready()
    assert fake.webhook["url"] == "https://pizza-1a2b3c.herokuapp.com/webhook"
    log = process.logged("Application startup complete.")
    assert "WEB_CONCURRENCY=2 comes from Heroku's Python buildpack" in log
    assert log.count("Started server process") == 1  # one process, not the buildpack's two


def test_heroku_review_app_with_the_production_token_does_not_take_the_production_webhook(
    database_url: str, telegram_root: str, fake: FakeTelegram, tmp_path: Path, started: list[BotProcess]
) -> None:
    production = "https://pizza-1a2b3c.herokuapp.com/webhook"
    register_elsewhere(telegram_root, production)
    env = heroku_env(
        database_url, telegram_root, HEROKU_APP_DEFAULT_DOMAIN_NAME="pizza-pr-7-9f8e7d.herokuapp.com"
    )
    process = web(PROCFILE["web"], env, tmp_path / "review.log", started)
    assert process.proc.wait(60) == 1
    [line] = [line for line in process.output().splitlines() if line.startswith("bot: ")]
    assert line.startswith(
        f"bot: HEROKU_APP_DEFAULT_DOMAIN_NAME: Telegram delivers this bot's updates to {production}"
    )
    assert fake.webhook["url"] == production  # untouched
    # Production itself, restarted, and moving to its own custom domain: still its own to move.
    env = heroku_env(
        database_url,
        telegram_root,
        HEROKU_APP_DEFAULT_DOMAIN_NAME="pizza-1a2b3c.herokuapp.com",
        WEBHOOK_URL="https://pizza.example.com/webhook",
    )
    web(PROCFILE["web"], env, tmp_path / "production.log", started).wait_ready()
    assert fake.webhook["url"] == "https://pizza.example.com/webhook"


def test_moving_a_webhook_from_another_deployment_takes_an_explicit_set_webhook(
    database_url: str, telegram_root: str, fake: FakeTelegram, tmp_path: Path, started: list[BotProcess]
) -> None:
    register_elsewhere(telegram_root, "https://old-host.example.com/webhook")
    env = platform_env(database_url, telegram_root, RENDER_EXTERNAL_URL="https://pizza.onrender.com")
    assert run_once("python -m bot set-webhook", env).returncode == 0
    web(RENDER["startCommand"], env, tmp_path / "web.log", started).wait_ready()
    assert fake.webhook["url"] == "https://pizza.onrender.com/webhook"


# --- Render and Fly: their commands as their files give them ------------------------------------------


def test_render_pre_deploy_then_start_registers_its_external_url(
    empty_database_url: str, telegram_root: str, fake: FakeTelegram, tmp_path: Path, started: list[BotProcess]
) -> None:
    env = platform_env(
        empty_database_url, telegram_root, RENDER="true", RENDER_EXTERNAL_URL="https://pizza.onrender.com"
    )
    env |= {e["key"]: e["value"] for e in RENDER["envVars"] if "value" in e}
    assert run_once(RENDER["preDeployCommand"], env).returncode == 0
    web(RENDER["startCommand"], env, tmp_path / "web.log", started).wait_ready()
    assert fake.webhook["url"] == "https://pizza.onrender.com/webhook"


def test_fly_release_then_the_image_command_registers_its_app_and_stops_on_its_kill_signal(
    empty_database_url: str, telegram_root: str, fake: FakeTelegram, tmp_path: Path, started: list[BotProcess]
) -> None:
    env = platform_env(empty_database_url, telegram_root, FLY_APP_NAME="pizza", **FLY["env"])
    assert run_once(FLY["deploy"]["release_command"], env).returncode == 0
    process = web("exec python -m bot serve", env, tmp_path / "web.log", started)  # the image's CMD
    process.wait_ready()
    assert fake.webhook["url"] == "https://pizza.fly.dev/webhook"
    kill_signal = getattr(signal, FLY["kill_signal"])
    assert process.terminate(timeout=float(FLY["kill_timeout"].removesuffix("s")), signum=kill_signal) == 0
    assert "Traceback" not in process.output()


# --- Docker on a VPS: compose's environment, against a PostgreSQL set up as the postgres image does ------

COMPOSE = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())


def interpolate(value: str, dotenv: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default} (what deploy/compose.yaml uses)."""

    def one(match: re.Match[str]) -> str:
        name, form, rest = match[1], match[2] or "", match[3] or ""
        if name in dotenv and (dotenv[name] or form != ":-"):
            return dotenv[name]
        if form == ":?":
            pytest.fail(f"compose would stop: {rest}")
        return rest if form == ":-" else ""

    return re.sub(r"\$\{(\w+)(:\?|:-)?([^}]*)\}", one, value)


@contextlib.contextmanager
def postgres_like_the_image(user: str, password: str, database: str, run_as: str | None) -> Iterator[int]:
    """initdb with POSTGRES_USER and POSTGRES_PASSWORD and password authentication, then POSTGRES_DB, as the
    postgres image's entrypoint does; listening on 127.0.0.1 (compose's `db`) at the port yielded."""
    home = Path(tempfile.mkdtemp(prefix="bot-pg-"))
    home.chmod(0o755)  # the server's own user (when run as root) must reach it
    data, secret, port = home / "data", home / "password", free_port()
    secret.write_text(password)
    if run_as is not None:
        shutil.chown(home, run_as)
        shutil.chown(secret, run_as)

    def pg(*args: str | Path) -> None:
        subprocess.run(args, user=run_as, check=True, capture_output=True, timeout=120)

    try:
        pg(POSTGRES_BIN_PATH / "initdb", "-D", data, "-U", user, f"--pwfile={secret}", "--auth=scram-sha-256")
        options = f"-h 127.0.0.1 -p {port} -k {home}"
        pg(POSTGRES_BIN_PATH / "pg_ctl", "-D", data, "-l", home / "log", "-o", options, "-w", "start")
        try:
            env = {**os.environ, "PGPASSWORD": password}
            create = [
                POSTGRES_BIN_PATH / "createdb",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                user,
                database,
            ]
            subprocess.run(create, env=env, check=True, capture_output=True, timeout=60)
            yield port
        finally:
            pg(POSTGRES_BIN_PATH / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(home, ignore_errors=True)


# What breaks a URL it is pasted into: /, #, @, :, ?, % and a space.
AWKWARD_PASSWORD = "p/ss#w@rd:?%2F x"


def test_compose_connects_with_a_postgres_password_that_would_break_a_url(
    pg_cluster: Any, tmp_path: Path
) -> None:
    dotenv = {
        "BOT_TOKEN": TOKEN,
        "WEBHOOK_SECRET": "s3cret",
        "POSTGRES_PASSWORD": AWKWARD_PASSWORD,
        "DOMAIN": "bot.example.com",
    }
    db = {k: interpolate(str(v), dotenv) for k, v in COMPOSE["services"]["db"]["environment"].items()}
    run_as = getattr(pg_cluster, "system_user", None)
    with postgres_like_the_image(
        db["POSTGRES_USER"], db["POSTGRES_PASSWORD"], db["POSTGRES_DB"], run_as
    ) as port:
        for service in ("migrate", "bot"):
            env = {
                k: interpolate(str(v), dotenv) for k, v in COMPOSE["services"][service]["environment"].items()
            }
            # Compose's network resolves `db` to the database's container; here it is 127.0.0.1:port.
            env["DATABASE_URL"] = env["DATABASE_URL"].replace("@db:5432/", f"@127.0.0.1:{port}/")
            migrated = run_once("python -m bot migrate", {**env, "PATH": PATH})
            assert migrated.returncode == 0, f"{service}: {migrated.stderr}"
