"""Settings, read from the environment once at start-up.

Every problem is a ConfigError whose message names the variable and what is wrong with it; the command
line prints that one line and exits, so a misconfigured deploy fails loudly and readably.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit

from .errors import BotError
from .files import MAX_UPLOAD_BYTES
from .libpq import UnsupportedParameter, for_asyncpg
from .pooler import POOLER_MODES

__all__ = ["ConfigError", "Settings", "check_webhook_url", "load_settings"]

_TOKEN = re.compile(r"^(\d{1,20}):[A-Za-z0-9_-]{10,}$")
# What Telegram accepts as setWebhook's secret_token.
_SECRET = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_USERNAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{3,31}$")

TRIAL_USERNAME = "local_trial_bot"
# The app `serve` and `poll` run unless APP or --app names another: the one this repository ships. A
# string, so that the framework imports no app.
DEFAULT_APP = "bot.apps.pizza:build_bot"
_APP = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

# What libpq (and asyncpg) accept; anything else fails deep inside the driver at the first connection.
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")


class ConfigError(BotError, ValueError):
    """A setting is missing or malformed. The message starts with the variable's name."""


@dataclass(frozen=True)
class Settings:
    bot_token: str | None
    webhook_secret: str
    webhook_secret_generated: bool
    database_url: str | None
    # For migrations: a direct (not pooled) URL when DATABASE_URL goes through a pooler.
    database_direct_url: str | None
    # PGPASSWORD, which asyncpg uses when a URL has no password: read only to keep it out of the logs.
    pgpassword: str | None
    # libpq-only parameters left out of those URLs, one line each, for the log (bot/libpq.py).
    database_notes: tuple[str, ...]
    # DB_POOLER: "auto", "transaction" or "none" (bot/pooler.py).
    db_pooler: str
    telegram_api_root: str
    webhook_url: str | None
    # The variable webhook_url came from: WEBHOOK_URL, or the platform's that it was derived from.
    webhook_url_source: str | None
    # Every URL this deployment answers at, by its settings (WEBHOOK_URL and each platform variable set):
    # a webhook Telegram already calls at one of them is this deployment's to move (bot/webhook.py).
    own_webhook_urls: tuple[str, ...]
    webhook_max_connections: int
    # bot/webhook_watch.py: how often serve reads getWebhookInfo (0: never), and the queue worth a warning.
    webhook_watch_interval: float
    webhook_pending_warning: int
    migrate_on_start: bool
    host: str
    port: int
    bot_username: str | None
    db_pool_min: int
    db_pool_max: int
    db_acquire_timeout: float
    db_lock_timeout: float
    db_statement_timeout: float
    db_optimistic: bool
    session_cache: int
    request_deadline: float
    dead_letter_after: int
    dead_letter_after_seconds: float
    max_body_bytes: int
    outbox_lease: float
    bot_api_timeout: float
    http_read_timeout: float
    http_max_connections: int
    sweep_interval: float
    shutdown_timeout: float
    embedded_pg_dir: Path | None
    log_level: str
    webhook_reply: bool
    playground: bool
    app: str
    api_call_timeout: float
    upload_max_bytes: int
    log_format: str
    metrics_token: str | None
    metrics_port: int | None
    send_rate_global: int
    send_rate_group: int
    send_rate_private: int
    outbox_backoff_max: float
    outbox_give_up: float
    send_pause_max: float
    web_concurrency: int
    # WEB_CONCURRENCY's value when the platform, not the operator, set it (and it was not followed).
    web_concurrency_ignored: int | None
    timer_concurrency: int

    @property
    def bot_id(self) -> int:
        """The bot's id is the token's first part; 0 for the local trial, which has no token."""
        if self.bot_token is None:
            return 0
        return int(self.bot_token.split(":", 1)[0])


N = TypeVar("N", int, float)


def _number(env: Mapping[str, str], name: str, default: N, low: N, high: N, *, unit: str = "") -> N:
    """An int or float setting (the type of `default`), checked against its range."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    kind = type(default)
    try:
        value = kind(raw)
    except ValueError:
        expected = "a whole number" if kind is int else f"a number of {unit}"
        raise ConfigError(f"{name}: expected {expected}, got {raw!r}") from None
    if not low <= value <= high:
        shown = [f"{n:g}" if isinstance(n, float) else str(n) for n in (low, high, value)]
        unit = f" {unit}" if unit else ""
        raise ConfigError(f"{name}: must be between {shown[0]} and {shown[1]}{unit}, got {shown[2]}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    return _number(env, name, default, low, high)


def _seconds(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    return _number(env, name, float(default), float(low), float(high), unit="seconds")


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in allowed:
        raise ConfigError(f"{name}: one of {', '.join(allowed)}, got {raw!r}")
    return raw


def _url(name: str, raw: str, schemes: tuple[str, ...]) -> str | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        parts = urlsplit(raw)
    except ValueError as exc:  # an unbalanced IPv6 bracket, for one
        raise ConfigError(f"{name}: not a valid URL ({exc})") from None
    if parts.scheme not in schemes:
        # Nothing of a user or password: the scheme, or (with none) the start of what follows the last @.
        # (What precedes a :// is a scheme only if it could be one: a parameter's URL may follow a password.)
        scheme, found, _ = raw.partition("://")
        is_scheme = found and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme)
        shown = scheme + "://" if is_scheme else raw.rpartition("@")[2][:12]
        raise ConfigError(
            f"{name}: must start with {' or '.join(s + '://' for s in schemes)}, got {shown!r}…"
        )
    if not parts.netloc and not parts.query:
        raise ConfigError(f"{name}: has no host")
    # Each of `host:port,host:port` (PostgreSQL URLs may list several hosts).
    for host in parts.netloc.rpartition("@")[2].split(","):
        port = host.rpartition("]")[2].partition(":")[2] if host.startswith("[") else host.partition(":")[2]
        if port and not (port.isdigit() and int(port) <= 65535):
            raise ConfigError(f"{name}: the port is not a number from 0 to 65535, got {port[:12]!r}")
    return raw


def _check_userinfo(name: str, raw: str) -> None:
    """A password pasted unencoded with a / ? or # in it ends the URL's address part there: what follows
    would be checked as a port, path or query, and the error would quote the password's first characters.
    One with an @ is split by asyncpg at the first @, which leaves the rest of it as the host."""
    _, found, rest = raw.partition("://")
    address = re.split(r"[/?#]", rest, maxsplit=1)[0]
    cut_off, at, beyond = rest[len(address) :].partition("@")
    if found and (
        address.count("@") > 1
        or (at and "@" not in address and not _an_at_of_its_own(address, cut_off, beyond))
    ):
        raise ConfigError(
            f"{name}: the user or password holds a / ? # or @ (each ends a URL's address part, or its"
            " user): write them percent-encoded, %2F %3F %23 %40 (an @ of the database name too, after"
            " a host:port with no user)"
        )


# `host`, `host:port`, `[v6]:port`, comma-separated: an address that is one, with no user before it.
_HOST = r"(?:[\w.%-]*|\[[\w:.%]*\])(?::\d+)?"
_HOSTS = re.compile(f"{_HOST}(?:,{_HOST})*")


def _an_at_of_its_own(address: str, cut_off: str, beyond: str) -> bool:
    """Whether the @ after a URL's address part, which has no user, is not a cut-off user's: it is in a
    parameter's value (an = or & after the ?; Azure's user=bot@server), or in the database name (legal in
    PostgreSQL: `postgresql://host/my@db`, as libpq and asyncpg read it). An = before any ? is the
    password's own (a base64 one's padding, after a /), not a parameter.

    For the database name, the address must be hosts, and what follows the @ no host with a port or a
    path (`bot/x@host/db`: a user cut at its /). One host with a port is refused all the same: it cannot
    be told from a user and a password cut at its / (`bot:1234/x@host`, which libpq reads as host "bot",
    port 1234, database "x@host"); the @ of such a database name is written %40."""
    if re.search(r"\?.*[=&]", cut_off):
        return True
    database = re.split(r"[?#]", beyond, maxsplit=1)[0]
    return (
        _HOSTS.fullmatch(address) is not None
        and re.fullmatch(r"[^,\[]*:\d+", address) is None
        and re.fullmatch(r"/[^?#]*", cut_off) is not None
        and not re.search(r"[/:]", database)
    )


def _database_url(env: Mapping[str, str], name: str, notes: list[str]) -> str | None:
    """A postgres URL whose parts the driver will accept: checked here, so that a typo is one line at
    start-up, not a traceback from inside asyncpg at the first connection. libpq-only parameters are
    left out (a note for each goes to `notes`)."""
    raw = env.get(name, "")
    _check_userinfo(name, raw.strip())
    url = _url(name, raw, ("postgres", "postgresql"))
    if url is None:
        return None
    try:
        url, left_out = for_asyncpg(url)
    except UnsupportedParameter as exc:
        raise ConfigError(f"{name}: {exc}") from None
    notes.extend(f"{name}: {note}" for note in left_out)
    for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key == "sslmode" and value not in _SSLMODES:
            raise ConfigError(f"{name}: sslmode must be one of {', '.join(_SSLMODES)}, got {value!r}")
        if key == "target_session_attrs" and value not in _SESSION_ATTRS:
            raise ConfigError(
                f"{name}: target_session_attrs must be one of {', '.join(_SESSION_ATTRS)}, got {value!r}"
            )
        if key == "port" and not all(p.isdigit() and int(p) <= 65535 for p in value.split(",")):
            raise ConfigError(f"{name}: the port is not a number from 0 to 65535, got {value[:12]!r}")
    return url


# Platforms that tell a process its public address, and how that becomes the webhook's URL.
_PLATFORM_URLS = (
    ("RENDER_EXTERNAL_URL", "{}/webhook"),  # Render: https://<service>.onrender.com
    ("FLY_APP_NAME", "https://{}.fly.dev/webhook"),  # Fly.io
    # Heroku, with runtime dyno metadata on (`heroku labs:enable runtime-dyno-metadata`): app hostnames
    # carry a random suffix, so the app's name alone is not enough.
    ("HEROKU_APP_DEFAULT_DOMAIN_NAME", "https://{}/webhook"),
    ("RAILWAY_PUBLIC_DOMAIN", "https://{}/webhook"),  # Railway, once the service has a public domain
)


def check_webhook_url(name: str, raw: str) -> str | None:
    """`raw` if Telegram can deliver updates to it (None when empty), else ConfigError naming `name`:
    WEBHOOK_URL, or the URL `set-webhook --url` was given."""
    url = _url(name, raw, ("https", "http"))
    if url is not None:
        address = urlsplit(url)
        if address.path in ("", "/"):
            # Telegram would POST every update to /, answered 404: a healthy-looking bot receiving nothing.
            raise ConfigError(
                f"{name}: has no path, and the bot answers at /webhook:"
                f" {address.scheme}://{address.netloc}/webhook"
            )
    return url


def _webhook_urls(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """WEBHOOK_URL, then each URL derived from the platform's variables: (url, the variable it came from)."""
    found = []
    explicit = check_webhook_url("WEBHOOK_URL", env.get("WEBHOOK_URL", ""))
    if explicit is not None:
        found.append((explicit, "WEBHOOK_URL"))
    for name, template in _PLATFORM_URLS:
        value = env.get(name, "").strip().rstrip("/")
        if value:
            found.append((template.format(value), name))
    return found


def _web_concurrency(env: Mapping[str, str]) -> tuple[int, int | None]:
    """WEB_CONCURRENCY as the operator set it; a value Heroku's Python buildpack chose (it sets 2 to 17 by
    the dyno's size, and says so in WEB_CONCURRENCY_SET_BY) is not followed: every process has its own
    pool, and with several of them /metrics answers from a different one at each scrape."""
    value = _int(env, "WEB_CONCURRENCY", 1, 1, 64)
    if env.get("WEB_CONCURRENCY_SET_BY", "").strip() == "heroku/python":
        return 1, value
    return value, None


def load_settings(
    env: Mapping[str, str] | None = None, *, needs_secret: bool = True, needs_database: bool = True
) -> Settings:
    """Read and check every setting. `needs_secret` and `needs_database` are what the command at hand
    requires when BOT_TOKEN is set: `migrate` needs no secret, the webhook commands need no database."""
    env = os.environ if env is None else env

    token = env.get("BOT_TOKEN", "").strip() or None
    if token is not None and not _TOKEN.match(token):
        raise ConfigError(
            "BOT_TOKEN: not a bot token (expected '<digits>:<letters, digits, _ or ->' from @BotFather)"
        )

    secret = env.get("WEBHOOK_SECRET", "").strip() or None
    generated = False
    if secret is None:
        if token is not None and needs_secret:
            raise ConfigError("WEBHOOK_SECRET: required when BOT_TOKEN is set (1-256 of A-Z a-z 0-9 _ -)")
        # Local trial: a fresh secret each start, printed by `serve`, so even a trial is not an open door.
        secret, generated = secrets.token_urlsafe(24), True
    elif not _SECRET.match(secret):
        raise ConfigError(
            "WEBHOOK_SECRET: must be 1-256 characters, only A-Z a-z 0-9 _ and - (Telegram's rule)"
        )

    database_notes: list[str] = []
    database_url = _database_url(env, "DATABASE_URL", database_notes)
    # Read whether or not it matters here, so that a typo is named before the day it would.
    allow_embedded = _bool(env, "ALLOW_EMBEDDED_DB")
    if database_url is None and token is not None and needs_database and not allow_embedded:
        # A real bot on the embedded trial database loses every count when the platform restarts it.
        raise ConfigError(
            "DATABASE_URL: required when BOT_TOKEN is set (the embedded database is for local trials and"
            " is lost on a platform's restart; ALLOW_EMBEDDED_DB=1 to use it anyway)"
        )
    database_direct_url = _database_url(env, "DATABASE_DIRECT_URL", database_notes)
    pooler = env.get("DB_POOLER", "").strip().lower() or "auto"
    if pooler not in POOLER_MODES:
        raise ConfigError(f"DB_POOLER: one of {', '.join(POOLER_MODES)}, got {pooler!r}")
    api_root = _url("TELEGRAM_API_ROOT", env.get("TELEGRAM_API_ROOT", ""), ("https", "http"))
    api_root = api_root or "https://api.telegram.org"
    webhook_urls = _webhook_urls(env)
    webhook_url, webhook_url_source = webhook_urls[0] if webhook_urls else (None, None)
    web_concurrency, web_concurrency_ignored = _web_concurrency(env)

    username = env.get("BOT_USERNAME", "").strip().lstrip("@") or None
    if username is not None and not _USERNAME.match(username):
        raise ConfigError(f"BOT_USERNAME: not a Telegram username: {username!r}")

    pool_min = _int(env, "DB_POOL_MIN", 1, 0, 1000)
    pool_max = _int(env, "DB_POOL_MAX", 10, 1, 1000)
    if pool_min > pool_max:
        raise ConfigError(f"DB_POOL_MIN: {pool_min} is more than DB_POOL_MAX ({pool_max})")

    log_level = env.get("LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL: one of DEBUG, INFO, WARNING, ERROR, got {log_level!r}")

    pg_dir = env.get("EMBEDDED_PG_DIR", "").strip()
    # The playground injects updates into the bot, so a bot with a token gets it only when asked for.
    playground = _bool(env, "PLAYGROUND") if env.get("PLAYGROUND", "").strip() else token is None

    app = env.get("APP", "").strip() or DEFAULT_APP
    if not _APP.match(app):
        raise ConfigError(f"APP: expected module:factory (like {DEFAULT_APP}), got {app!r}")
    log_format = env.get("LOG_FORMAT", "text").strip().lower() or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT: text or json, got {log_format!r}")

    metrics_token = env.get("METRICS_TOKEN", "").strip() or None
    if metrics_token is not None and len(metrics_token) < 16:
        raise ConfigError("METRICS_TOKEN: at least 16 characters (it guards /metrics)")
    metrics_port = _int(env, "METRICS_PORT", 0, 0, 65535) or None

    # A call still in flight when its lease runs out would be sent again by a sweeper: a doubled reply.
    api_timeout = _seconds(env, "BOT_API_TIMEOUT", 30.0, 0.5, 300)
    lease = _seconds(env, "OUTBOX_LEASE", 60.0, 0.5, 3600)
    if lease <= api_timeout:
        raise ConfigError(
            f"OUTBOX_LEASE: must be longer than BOT_API_TIMEOUT ({api_timeout:g} s), got {lease:g} s"
        )

    return Settings(
        bot_token=token,
        webhook_secret=secret,
        webhook_secret_generated=generated,
        database_url=database_url,
        database_direct_url=database_direct_url,
        pgpassword=env.get("PGPASSWORD") or None,  # as it is, spaces and all: what asyncpg sends
        database_notes=tuple(database_notes),
        db_pooler=pooler,
        telegram_api_root=api_root.rstrip("/"),
        webhook_url=webhook_url,
        webhook_url_source=webhook_url_source,
        own_webhook_urls=tuple(url for url, _ in webhook_urls),
        # Telegram's range; its default is 40.
        webhook_max_connections=_int(env, "WEBHOOK_MAX_CONNECTIONS", 40, 1, 100),
        webhook_watch_interval=_seconds(env, "WEBHOOK_WATCH_INTERVAL", 60.0, 0, 3600),
        webhook_pending_warning=_int(env, "WEBHOOK_PENDING_WARNING", 100, 1, 10_000_000),
        migrate_on_start=_bool(env, "MIGRATE_ON_START"),
        host=env.get("HOST", "").strip() or "127.0.0.1",
        port=_int(env, "PORT", 8000, 1, 65535),
        bot_username=username,
        db_pool_min=pool_min,
        db_pool_max=pool_max,
        db_acquire_timeout=_seconds(env, "DB_ACQUIRE_TIMEOUT", 5.0, 0.1, 60),
        db_lock_timeout=_seconds(env, "DB_LOCK_TIMEOUT", 5.0, 0.1, 60),
        db_statement_timeout=_seconds(env, "DB_STATEMENT_TIMEOUT", 10.0, 0.1, 60),
        # Optimistic by default: 1.18x (C) to 1.88x (B) the locking mode's updates/s on every workload, in
        # the same runs (bench/README.md).
        db_optimistic=_choice(env, "DB_CONCURRENCY", "optimistic", ("locked", "optimistic")) == "optimistic",
        # About 350 bytes per session of one counter (tracemalloc over 5,000 SessionCache.put calls of that
        # shape): 5,000 keep a process near 56 MB under the soak (bench/README.md).
        session_cache=_int(env, "SESSION_CACHE", 5000, 0, 1_000_000),
        # Well under Telegram's 60 s, after which it would redeliver while we may still be working.
        request_deadline=_seconds(env, "REQUEST_DEADLINE", 25.0, 1, 55),
        # An update that keeps failing transiently (503 after 503) becomes a dead letter at its Nth
        # failure once this long has passed since its first, instead of holding its chat for Telegram's
        # 24 hours of redeliveries; both, so that a short outage does not dead-letter what it delays.
        dead_letter_after=_int(env, "DEAD_LETTER_AFTER", 5, 1, 1000),
        dead_letter_after_seconds=_seconds(env, "DEAD_LETTER_AFTER_SECONDS", 300.0, 0, 86400),
        max_body_bytes=_int(env, "MAX_BODY_BYTES", 1024 * 1024, 1024 * 1024, 64 * 1024 * 1024),
        outbox_lease=lease,
        bot_api_timeout=api_timeout,
        http_read_timeout=_seconds(env, "HTTP_READ_TIMEOUT", 10.0, 0.5, 60),
        http_max_connections=_int(env, "HTTP_MAX_CONNECTIONS", 1000, 1, 100_000),
        sweep_interval=_seconds(env, "OUTBOX_SWEEP_INTERVAL", 1.0, 0.1, 3600),
        shutdown_timeout=_seconds(env, "SHUTDOWN_TIMEOUT", 20.0, 1, 300),
        embedded_pg_dir=Path(pg_dir).expanduser() if pg_dir else None,
        log_level=log_level,
        webhook_reply=_bool(env, "WEBHOOK_REPLY"),
        playground=playground,
        app=app,
        # Handlers wait for `ctx.api` calls while holding their session rows locked: keep it short.
        api_call_timeout=_seconds(env, "API_CALL_TIMEOUT", 5.0, 0.1, 30),
        # The public Bot API takes files of up to 50 MB; a local Bot API server, up to 2000 MB.
        upload_max_bytes=_int(env, "UPLOAD_MAX_BYTES", MAX_UPLOAD_BYTES, 1, 2000 * 1024 * 1024),
        log_format=log_format,
        metrics_token=metrics_token,
        metrics_port=metrics_port,
        send_rate_global=_int(env, "SEND_RATE_GLOBAL", 30, 1, 1000),
        send_rate_group=_int(env, "SEND_RATE_GROUP", 20, 1, 1000),
        send_rate_private=_int(env, "SEND_RATE_PRIVATE", 1, 1, 1000),
        outbox_backoff_max=_seconds(env, "OUTBOX_BACKOFF_MAX", 60.0, 1, 3600),
        outbox_give_up=_seconds(env, "OUTBOX_GIVE_UP", 3600.0, 10, 7 * 86400),
        # Telegram's own pauses for the whole bot's limit are seconds long; a longer retry_after is a
        # chat's, and pausing every chat for it would silence the bot.
        send_pause_max=_seconds(env, "SEND_PAUSE_MAX", 30.0, 1, 300),
        web_concurrency=web_concurrency,
        web_concurrency_ignored=web_concurrency_ignored,
        # Timers fired at once by one process, each holding a pooled connection while it runs.
        timer_concurrency=_int(env, "TIMER_CONCURRENCY", 4, 1, 100),
    )
