from __future__ import annotations

import pytest

from bot.config import ConfigError, load_settings

TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
PRODUCTION = {
    "BOT_TOKEN": TOKEN,
    "WEBHOOK_SECRET": "s3cret_-X",
    "DATABASE_URL": "postgresql://u:p@db:5432/bot",
}


def test_defaults_give_a_local_trial_with_a_generated_secret() -> None:
    settings = load_settings({})
    assert settings.bot_token is None
    assert settings.bot_id == 0
    assert settings.webhook_secret_generated
    assert len(settings.webhook_secret) >= 24
    assert settings.database_url is None
    assert settings.telegram_api_root == "https://api.telegram.org"
    assert settings.port == 8000
    assert settings.max_body_bytes == 1024 * 1024
    # An update failing transiently is given up on at its 5th failure, 5 minutes after its first.
    assert (settings.dead_letter_after, settings.dead_letter_after_seconds) == (5, 300.0)


def test_production_settings_are_read_as_given() -> None:
    settings = load_settings(
        {**PRODUCTION, "PORT": "5000", "TELEGRAM_API_ROOT": "http://127.0.0.1:9/", "DB_LOCK_TIMEOUT": "2.5"}
    )
    assert settings.bot_id == 123456789
    assert settings.webhook_secret == "s3cret_-X"
    assert not settings.webhook_secret_generated
    assert settings.port == 5000
    assert settings.telegram_api_root == "http://127.0.0.1:9"
    assert settings.db_lock_timeout == 2.5


@pytest.mark.parametrize(("value", "optimistic"), [("", True), ("locked", False), ("Optimistic", True)])
def test_db_concurrency_chooses_the_transaction_mode(value: str, optimistic: bool) -> None:
    assert load_settings({"DB_CONCURRENCY": value}).db_optimistic is optimistic


def test_sslmode_in_database_url_is_kept_for_the_driver() -> None:
    url = "postgres://u:p@db.example.com:5432/bot?sslmode=require"
    assert load_settings({**PRODUCTION, "DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    ("env", "variable", "complaint"),
    [
        ({"BOT_TOKEN": "not-a-token"}, "BOT_TOKEN", "not a bot token"),
        ({"BOT_TOKEN": TOKEN}, "WEBHOOK_SECRET", "required when BOT_TOKEN is set"),
        ({"WEBHOOK_SECRET": "has space"}, "WEBHOOK_SECRET", "A-Z a-z 0-9 _ and -"),
        ({"WEBHOOK_SECRET": "x" * 257}, "WEBHOOK_SECRET", "1-256 characters"),
        ({"DATABASE_URL": "mysql://localhost/db"}, "DATABASE_URL", "postgres:// or postgresql://"),
        ({"DATABASE_URL": "postgresql://"}, "DATABASE_URL", "no host"),
        ({"TELEGRAM_API_ROOT": "ftp://x"}, "TELEGRAM_API_ROOT", "https:// or http://"),
        ({"PORT": "eighty"}, "PORT", "whole number"),
        ({"PORT": "70000"}, "PORT", "between 1 and 65535"),
        ({"DB_POOL_MIN": "5", "DB_POOL_MAX": "2"}, "DB_POOL_MIN", "more than DB_POOL_MAX"),
        ({"APP": "examples/todo.py"}, "APP", "expected module:factory"),
        ({"API_CALL_TIMEOUT": "60"}, "API_CALL_TIMEOUT", "between 0.1 and 30 seconds"),
        ({"DB_LOCK_TIMEOUT": "soon"}, "DB_LOCK_TIMEOUT", "number of seconds"),
        ({"REQUEST_DEADLINE": "90"}, "REQUEST_DEADLINE", "between 1 and 55"),
        ({"MAX_BODY_BYTES": "1000"}, "MAX_BODY_BYTES", "between 1048576"),
        ({"BOT_USERNAME": "x"}, "BOT_USERNAME", "not a Telegram username"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL", "one of DEBUG"),
        ({"DATABASE_URL": "postgresql://u@db:5o32/x"}, "DATABASE_URL", "port is not a number"),
        ({"DATABASE_URL": "postgresql://u@db:65536/x"}, "DATABASE_URL", "port is not a number"),
        ({"DATABASE_URL": "postgresql://u@/x?host=/tmp&port=x"}, "DATABASE_URL", "port is not a number"),
        ({"DATABASE_URL": "postgresql://u@db/x?sslmode=on"}, "DATABASE_URL", "sslmode must be one of"),
        ({"OUTBOX_LEASE": "20"}, "OUTBOX_LEASE", "longer than BOT_API_TIMEOUT (30 s)"),
        ({"BOT_API_TIMEOUT": "5", "OUTBOX_LEASE": "5"}, "OUTBOX_LEASE", "longer than BOT_API_TIMEOUT"),
        ({"HTTP_READ_TIMEOUT": "0"}, "HTTP_READ_TIMEOUT", "between 0.5 and 60"),
        ({"HTTP_MAX_CONNECTIONS": "0"}, "HTTP_MAX_CONNECTIONS", "between 1 and 100000"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT", "text or json"),
        ({"METRICS_TOKEN": "short"}, "METRICS_TOKEN", "at least 16 characters"),
        ({"METRICS_PORT": "99999"}, "METRICS_PORT", "between 0 and 65535"),
        ({"SEND_RATE_GLOBAL": "0"}, "SEND_RATE_GLOBAL", "between 1 and 1000"),
        ({"SEND_RATE_GROUP": "many"}, "SEND_RATE_GROUP", "whole number"),
        ({"OUTBOX_GIVE_UP": "1"}, "OUTBOX_GIVE_UP", "between 10 and 604800"),
        ({"OUTBOX_BACKOFF_MAX": "-1"}, "OUTBOX_BACKOFF_MAX", "between 1 and 3600"),
        ({"DB_POOLER": "pgbouncer"}, "DB_POOLER", "one of auto, transaction, none"),
        ({"DATABASE_DIRECT_URL": "mysql://db/x"}, "DATABASE_DIRECT_URL", "postgres:// or postgresql://"),
        ({"WEBHOOK_MAX_CONNECTIONS": "500"}, "WEBHOOK_MAX_CONNECTIONS", "between 1 and 100"),
        ({"MIGRATE_ON_START": "maybe"}, "MIGRATE_ON_START", "true or false"),
        ({"DB_CONCURRENCY": "yolo"}, "DB_CONCURRENCY", "one of locked, optimistic"),
        ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY", "between 1 and 64"),
        ({"DEAD_LETTER_AFTER": "0"}, "DEAD_LETTER_AFTER", "between 1 and 1000"),
        ({"DEAD_LETTER_AFTER_SECONDS": "never"}, "DEAD_LETTER_AFTER_SECONDS", "number of seconds"),
        ({"UPLOAD_MAX_BYTES": "50MB"}, "UPLOAD_MAX_BYTES", "whole number"),
        ({"UPLOAD_MAX_BYTES": "0"}, "UPLOAD_MAX_BYTES", "between 1 and 2097152000"),
    ],
)
def test_bad_settings_name_the_variable_and_the_problem(
    env: dict[str, str], variable: str, complaint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert complaint in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@h1:5432,h2:5433/bot?sslmode=verify-full",
        "postgresql://u@[::1]:5432/bot",
        "postgres://u@db/bot?sslmode=disable&port=6432",
    ],
)
def test_well_formed_database_urls_pass_the_checks(url: str) -> None:
    assert load_settings({"DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    "password",
    # (A base64 one: a / before an = of its padding, which is no parameter's = without a ? before it.)
    [
        "s3cr#et-Pa55",
        "s3cr/et-Pa55",
        "s3cr?et-Pa55",
        "9999#et-Pa55",
        "9999/et-Pa55",  # bot:9999 could be a host and port, but a host and port follow the @ too
        "s3cr@et-Pa55",
        "s3cr/et+Pa55=",
        "s3cr#et=Pa55",
    ],
)
@pytest.mark.parametrize("variable", ["DATABASE_URL", "DATABASE_DIRECT_URL"])
def test_a_password_that_breaks_its_url_is_named_as_such_and_never_shown(
    variable: str, password: str
) -> None:
    # Pasted unencoded, a / ? or # ends the URL's address part inside the password: the port check
    # then reported "the port is not a number, got 's3cr'", the password's first characters in the log.
    # An @ passed, and asyncpg, which splits at the first @, looked for a host "et-Pa55@db.example.com".
    with pytest.raises(ConfigError) as caught:
        load_settings({variable: f"postgresql://bot:{password}@db.example.com:5432/bot"})
    message = str(caught.value)
    assert message.startswith(f"{variable}: the user or password holds a / ? # or @ ")
    assert "%2F" in message
    assert password[:4] not in message
    # While an @ of a parameter, not of the address (Azure's user@server), is no such thing.
    for url in (
        "postgresql://db.example.com/bot?user=bot@myserver&password=pw",
        "postgresql://bot%40myserver:p%23ss@db.example.com/bot",
    ):
        assert getattr(load_settings({variable: url}), variable.lower()) == url


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://db.example.com/my@db",
        "postgresql://db.example.com/my@db?sslmode=require",
        "postgresql://db1:5432,[::1]:6432/team@bot",
        "postgresql://db.example.com:5432/my%40db",
    ],
)
def test_a_database_name_holding_an_at_sign_is_accepted_as_libpq_and_asyncpg_read_it(url: str) -> None:
    # PostgreSQL allows an @ in a database name, and with no user before the host no password can have
    # been cut off there: it was refused as an unencoded @ of the password. (After one host with a port,
    # as in bot:1234/x@host, it could be a password's: refused, the @ to be written %40.)
    assert load_settings({"DATABASE_URL": url}).database_url == url
    with pytest.raises(ConfigError, match=r"^DATABASE_URL: .* %40 \(an @ of the database name too"):
        load_settings({"DATABASE_URL": "postgresql://db.example.com:5432/my@db"})


@pytest.mark.parametrize(
    "url", ["https://bot.example.com", "https://bot.example.com/", "https://bot.example.com?x=1"]
)
def test_a_webhook_url_without_a_path_is_refused_saying_where_the_bot_answers(url: str) -> None:
    # Telegram would POST every update to /, which answers 404: a deploy that looks healthy and
    # receives nothing. (Another path stays allowed: a proxy may map it to /webhook.)
    with pytest.raises(ConfigError, match=r"^WEBHOOK_URL: .*/webhook"):
        load_settings({"WEBHOOK_URL": url})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("pg://bot:s3cretPa55@db/bot", "'pg://'"),
        ("postgresql+asyncpg://bot:s3cretPa55@db/bot", "'postgresql+asyncpg://'"),
        ("bot:s3cretPa55@db.example.com/bot", "'db.example.c'"),
        # A :// further on (a parameter's URL) is no scheme's: what precedes it holds the password.
        ("bot:s3cretPa55@db.example.com/bot?x=http://y", "'db.example.c'"),
    ],
)
def test_a_database_url_with_a_wrong_scheme_is_quoted_without_its_password(url: str, shown: str) -> None:
    # The first 12 characters were quoted, a short scheme's user and password included.
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATABASE_URL": url})
    assert str(caught.value).startswith("DATABASE_URL: must start with postgres:// or postgresql://")
    assert shown in str(caught.value)
    assert "s3cr" not in str(caught.value)


def test_unix_socket_database_url_is_accepted() -> None:
    url = "postgresql://postgres@/bot?host=/tmp/pg"
    assert load_settings({"DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    ("env", "playground"),
    [
        ({}, True),  # the local trial
        ({"PLAYGROUND": "0"}, False),
        (PRODUCTION, False),  # a bot with a token never shows it unasked
        ({**PRODUCTION, "PLAYGROUND": "1"}, True),
    ],
)
def test_the_playground_is_on_in_the_trial_and_opt_in_with_a_token(
    env: dict[str, str], playground: bool
) -> None:
    assert load_settings(env).playground is playground


def test_a_malformed_playground_setting_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^PLAYGROUND: expected true or false"):
        load_settings({"PLAYGROUND": "maybe"})


def test_operations_settings_default_to_telegrams_limits_and_no_public_metrics() -> None:
    settings = load_settings(PRODUCTION)
    assert (settings.send_rate_global, settings.send_rate_group, settings.send_rate_private) == (30, 20, 1)
    assert (settings.outbox_backoff_max, settings.outbox_give_up) == (60.0, 3600.0)
    assert settings.metrics_token is None and settings.metrics_port is None
    assert settings.log_format == "text"


def test_a_token_without_a_database_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"BOT_TOKEN": TOKEN, "WEBHOOK_SECRET": "s"})
    assert str(caught.value).startswith("DATABASE_URL: required when BOT_TOKEN is set")
    assert "ALLOW_EMBEDDED_DB=1" in str(caught.value)


def test_allow_embedded_db_lets_a_token_use_the_embedded_database() -> None:
    settings = load_settings({"BOT_TOKEN": TOKEN, "WEBHOOK_SECRET": "s", "ALLOW_EMBEDDED_DB": "1"})
    assert settings.database_url is None


@pytest.mark.parametrize("env", [{}, {"DATABASE_URL": "postgresql://u@db/bot"}])
def test_a_malformed_allow_embedded_db_is_named_even_where_it_is_not_needed(env: dict[str, str]) -> None:
    # A trial (or a deploy with DATABASE_URL) used to ignore the typo; the same value then meant
    # nothing once a token was added, where it is refused.
    with pytest.raises(ConfigError, match=r"^ALLOW_EMBEDDED_DB: expected true or false, got 'maybe'"):
        load_settings({**env, "ALLOW_EMBEDDED_DB": "maybe"})


def test_commands_that_need_no_secret_or_database_do_not_ask_for_them() -> None:
    # migrate: the database only; webhook-info and delete-webhook: the token only.
    assert load_settings({**PRODUCTION, "WEBHOOK_SECRET": ""}, needs_secret=False).database_url
    assert load_settings({"BOT_TOKEN": TOKEN}, needs_secret=False, needs_database=False).bot_token == TOKEN


@pytest.mark.parametrize(
    ("env", "url", "source"),
    [
        ({"WEBHOOK_URL": "https://bot.example.com/hook"}, "https://bot.example.com/hook", "WEBHOOK_URL"),
        (
            {"RENDER_EXTERNAL_URL": "https://pizza.onrender.com/"},
            "https://pizza.onrender.com/webhook",
            "RENDER_EXTERNAL_URL",
        ),
        ({"FLY_APP_NAME": "pizza"}, "https://pizza.fly.dev/webhook", "FLY_APP_NAME"),
        (
            {"HEROKU_APP_DEFAULT_DOMAIN_NAME": "pizza-1a2b3c.herokuapp.com", "HEROKU_APP_NAME": "pizza"},
            "https://pizza-1a2b3c.herokuapp.com/webhook",
            "HEROKU_APP_DEFAULT_DOMAIN_NAME",
        ),
        (
            {"RAILWAY_PUBLIC_DOMAIN": "pizza.up.railway.app"},
            "https://pizza.up.railway.app/webhook",
            "RAILWAY_PUBLIC_DOMAIN",
        ),
        # An explicit WEBHOOK_URL wins over what the platform says.
        (
            {"WEBHOOK_URL": "https://bot.example.com/webhook", "FLY_APP_NAME": "pizza"},
            "https://bot.example.com/webhook",
            "WEBHOOK_URL",
        ),
        ({}, None, None),
    ],
)
def test_the_webhook_url_is_derived_from_the_platform(
    env: dict[str, str], url: str | None, source: str | None
) -> None:
    settings = load_settings({**PRODUCTION, **env})
    assert (settings.webhook_url, settings.webhook_url_source) == (url, source)


def test_pooler_and_direct_url_settings() -> None:
    settings = load_settings(
        {**PRODUCTION, "DB_POOLER": "Transaction", "DATABASE_DIRECT_URL": "postgresql://u@db:5432/bot"}
    )
    assert settings.db_pooler == "transaction"
    assert settings.database_direct_url == "postgresql://u@db:5432/bot"
    assert load_settings(PRODUCTION).db_pooler == "auto"


def test_a_web_concurrency_heroku_s_buildpack_chose_is_not_followed() -> None:
    chosen = load_settings({"WEB_CONCURRENCY": "2", "WEB_CONCURRENCY_SET_BY": "heroku/python"})
    assert (chosen.web_concurrency, chosen.web_concurrency_ignored) == (1, 2)
    mine = load_settings({"WEB_CONCURRENCY": "3"})
    assert (mine.web_concurrency, mine.web_concurrency_ignored) == (3, None)


def test_every_url_the_deployment_answers_at_is_its_own() -> None:
    settings = load_settings(
        {
            "WEBHOOK_URL": "https://bot.example.com/webhook",
            "HEROKU_APP_DEFAULT_DOMAIN_NAME": "app-1a.herokuapp.com",
        }
    )
    assert settings.webhook_url == "https://bot.example.com/webhook"
    assert settings.own_webhook_urls == (
        "https://bot.example.com/webhook",
        "https://app-1a.herokuapp.com/webhook",
    )
