"""`serve` and `migrate`: what a platform's web and release processes run. Before uvicorn starts, `serve`
checks that the database is reachable and migrated, that Telegram knows the token, and points the
webhook at this deployment, so that each of these fails in one line rather than in a traceback."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import signal
import socket
import sys
from typing import Any

import httpx

from ..config import Settings
from ..dispatch import Bot
from ..runtime import bot_api, resolve_identity
from ..telegram import BotApi, BotApiError
from ..webhook import foreign_webhook, register, registration
from .base import Fail, bot_to_run, database, log, migrate_now, require_migrated

__all__ = ["migrate_command", "serve"]


async def _preflight(settings: Settings, bot: Bot[Any], *, check_migrations: bool) -> Settings:
    """The database is reachable and migrated, Telegram knows the token and calls our URL: settings
    with our username."""
    assert settings.database_url is not None
    if settings.migrate_on_start:
        applied = await migrate_now(settings)
        log.info("MIGRATE_ON_START: %s", "applied " + ", ".join(applied) if applied else "up to date")
    if check_migrations:
        await require_migrated(settings)
    if settings.bot_token is None:
        return settings
    async with httpx.AsyncClient(timeout=settings.bot_api_timeout) as client:
        api = bot_api(settings, client, settings.bot_token)
        me = await resolve_identity(settings, api)
        await _register_webhook(settings, api, bot)
    return dataclasses.replace(settings, bot_username=me.username)


async def _register_webhook(settings: Settings, api: BotApi, bot: Bot[Any]) -> None:
    """Point Telegram at this configuration. Done before listening, where a refusal can still stop the
    process in one line; a delivery arriving before we listen meets a refused connection, which Telegram
    retries like any failed delivery.

    Refused: serving with no URL while Telegram has none either (the bot would receive nothing, healthy
    all the while: Heroku's Deploy button without runtime dyno metadata did that), and taking over a
    webhook another deployment registered (bot.webhook.foreign_webhook)."""
    try:
        info: dict[str, Any] = await api.call("getWebhookInfo", {})
    except BotApiError as exc:
        raise Fail(f"BOT_TOKEN: getWebhookInfo at {settings.telegram_api_root} failed: {exc}") from exc
    if settings.webhook_url is None:
        if not info.get("url"):
            raise Fail(
                "WEBHOOK_URL: not set, nor a platform variable to derive it from, and Telegram has no"
                " webhook for this bot, so it would receive nothing. Set WEBHOOK_URL=https://<public"
                " host>/webhook (Heroku: or `heroku labs:enable runtime-dyno-metadata`, then restart), or"
                " run `python -m bot poll` where there is no public URL"
            )
        log.info("no WEBHOOK_URL: leaving the webhook as registered before, %s", info["url"])
        return
    foreign = foreign_webhook(info, settings.own_webhook_urls)
    if foreign is not None:
        raise Fail(
            f"{settings.webhook_url_source}: Telegram delivers this bot's updates to {foreign}, another"
            f" deployment; registering {settings.webhook_url} would take them from it (a review app or a"
            " staging copy given the production BOT_TOKEN?). Give this deployment a bot token of its own,"
            " or move the webhook here once with `python -m bot set-webhook`"
        )
    params = registration(settings, settings.webhook_url, bot.allowed_updates())
    try:
        await register(api, params)
    except BotApiError as exc:
        raise Fail(f"{settings.webhook_url_source}: {exc}") from exc
    log.info(
        "webhook set to %s (from %s) for %s",
        settings.webhook_url,
        settings.webhook_url_source,
        ", ".join(params["allowed_updates"]),
    )


def _explain_processes(settings: Settings) -> None:
    """How many processes serve, when the platform had another idea or metrics would suffer from it."""
    if settings.web_concurrency_ignored is not None:
        log.info(
            "WEB_CONCURRENCY=%d comes from Heroku's Python buildpack (WEB_CONCURRENCY_SET_BY), not from"
            " you: serving with 1 process. Set WEB_CONCURRENCY yourself for more; each has its own pool of"
            " DB_POOL_MAX connections",
            settings.web_concurrency_ignored,
        )
    if settings.web_concurrency > 1 and (settings.metrics_token or settings.metrics_port):
        log.warning(
            "WEB_CONCURRENCY=%d: each scrape of /metrics is answered by whichever of the %d processes takes"
            " it, with that process's own counters, so rates and totals computed from them are wrong. For"
            " metrics, run one process per machine or dyno and scale those instead",
            settings.web_concurrency,
            settings.web_concurrency,
        )


def _can_listen(host: str, port: int, host_name: str, port_name: str) -> None:
    """Bind once and let go, before the database starts or the webhook is registered: uvicorn would find
    a port in use, or a host that is not this machine's, only after both, and report it in a log line
    naming no setting (exiting 3)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # (as uvicorn decides)
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds)
        try:
            sock.bind((host, port))
        except OSError as exc:
            # Unresolvable, or not an address of this machine: the host's fault; in use, or below 1024
            # without the privilege: the port's.
            bad_host = isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
            raise Fail(
                f"{host_name if bad_host else port_name}: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from exc


def serve(settings: Settings, args: argparse.Namespace) -> int:
    from .. import server
    from ..app import create_app

    bot = bot_to_run(settings, args)
    host, port = args.host or settings.host, args.port or settings.port
    host_name = "--host" if args.host else "HOST"
    _can_listen(host, port, host_name, "--port" if args.port else "PORT")
    if settings.metrics_port is not None:
        _can_listen(host, settings.metrics_port, host_name, "METRICS_PORT")
    with database(settings, bot.name) as live:
        # Checked before uvicorn starts: a failure inside its lifespan would end in a traceback.
        checked = asyncio.run(_preflight(live, bot, check_migrations=not args.skip_migration_check))
        if checked.bot_token is None:
            # The local trial's banner, loaded only for it. It describes the configured database, not the
            # embedded one's URL, once database() has found the embedded server installed.
            from ..playground.banner import describe_database, trial_banner

            print(trial_banner(checked, host, port, describe_database(settings, bot.name)), flush=True)
        settings = checked
        _explain_processes(settings)
        if settings.webhook_secret_generated:
            log.warning(
                "no WEBHOOK_SECRET set; this run accepts updates with the header %s: %s",
                "X-Telegram-Bot-Api-Secret-Token",
                settings.webhook_secret,
            )
        # uvicorn stops gracefully on SIGTERM and SIGINT (what Fly sends by default, and Ctrl-C) alike, then
        # raises the signal again; exiting 0 from it tells the platform the stop was clean (anything still
        # unsent stays in the outbox for the next start), where SIGINT's default would end in a
        # KeyboardInterrupt traceback and status 130.
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, lambda *_: sys.exit(0))
        server.run(create_app(settings, bot=bot), settings, host, port)
    return 0


def migrate_command(settings: Settings, args: argparse.Namespace) -> int:
    # The app is loaded only to name the embedded database's folder: a release phase needs the database
    # alone, not an app that imports there.
    if settings.database_direct_url is not None or settings.database_url is not None:
        applied = asyncio.run(migrate_now(settings))
    else:
        with database(settings, bot_to_run(settings, args).name) as settings:
            applied = asyncio.run(migrate_now(settings))
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0
