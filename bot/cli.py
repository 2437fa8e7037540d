"""`python -m bot <command>` (also installed as `bot`): serve, migrate, poll, chat, and webhook management.

Errors a user can fix (configuration, an unmigrated or unreachable database, Telegram refusing the
token) end the process with one line on stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec

from .config import DEFAULT_APP, ConfigError, Settings, load_settings
from .dispatch import Bot
from .importer import AppError, load_app
from .logs import setup_logging
from .migrate import MigrationError, NotMigrated, check_migrated, migrate
from .runtime import StartupError, resolve_identity, start
from .storage import StorageUnavailable
from .telegram import BotApi, BotApiError, InvalidUpdate, decode_update

__all__ = ["main"]

log = logging.getLogger("bot.cli")


class _Fail(Exception):
    """A problem to report in one line."""


def _app(settings: Settings, args: argparse.Namespace) -> Bot[Any]:
    """The bot to run: --app, else the APP setting (default: the app this repository ships)."""
    try:
        return load_app(args.app or settings.app)
    except AppError as exc:
        raise _Fail(f"{'--app' if args.app else 'APP'}: {exc}") from exc


@contextlib.contextmanager
def _database(settings: Settings, app_name: str = "bot") -> Iterator[Settings]:
    """Settings with a DATABASE_URL: the configured one, or a local embedded PostgreSQL (migrated) kept
    in a folder named after the app."""
    if settings.database_url is not None:
        yield settings
        return
    from .embedded import EmbeddedPostgres, default_data_dir

    server = EmbeddedPostgres.start(default_data_dir(settings.embedded_pg_dir, app_name))
    try:
        dsn = server.dsn()
        applied = asyncio.run(migrate(dsn))
        if applied:
            log.info("local database: applied migrations %s", ", ".join(applied))
        yield dataclasses.replace(settings, database_url=dsn)
    finally:
        server.stop()


async def _preflight(settings: Settings, *, check_migrations: bool) -> Settings:
    """The database is reachable and migrated, and Telegram knows the token: settings with our username."""
    assert settings.database_url is not None
    if check_migrations:
        await _require_migrated(settings.database_url)
    if settings.bot_token is None:
        return settings
    async with httpx.AsyncClient(timeout=20) as client:
        me = await resolve_identity(settings, BotApi(settings.bot_token, client, settings.telegram_api_root))
    return dataclasses.replace(settings, bot_username=me.username)


async def _require_migrated(dsn: str) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # InterfaceError: asyncpg refusing a parameter of the URL that the settings check let through.
        raise _Fail(f"DATABASE_URL: cannot connect: {exc}") from exc
    try:
        await check_migrated(conn)
    finally:
        await conn.close()


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from . import server
    from .app import create_app
    from .playground.banner import describe_database, trial_banner

    bot = _app(settings, args)
    database = describe_database(settings, bot.name)  # before an embedded database fills in DATABASE_URL
    with _database(settings, bot.name) as settings:
        # Checked before uvicorn starts: a failure inside its lifespan would end in a traceback.
        settings = asyncio.run(_preflight(settings, check_migrations=not args.skip_migration_check))
        host = args.host or settings.host
        port = args.port or settings.port
        if settings.bot_token is None:
            print(trial_banner(settings, host, port, database), flush=True)
        if settings.webhook_secret_generated:
            log.warning(
                "no WEBHOOK_SECRET set; this run accepts updates with the header %s: %s",
                "X-Telegram-Bot-Api-Secret-Token",
                settings.webhook_secret,
            )
        # uvicorn stops gracefully on SIGTERM and then raises the signal again; exiting 0 from it tells
        # the platform the stop was clean (anything still unsent stays in the outbox for the next start).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server.run(create_app(settings, bot=bot), settings, host, port)
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    import asyncpg

    with _database(settings, _app(settings, args).name) as settings:
        assert settings.database_url is not None
        try:
            applied = asyncio.run(migrate(settings.database_url))
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise _Fail(f"DATABASE_URL: cannot connect: {exc}") from exc
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


async def _call(settings: Settings, method: str, params: dict[str, Any]) -> Any:
    if settings.bot_token is None:
        raise _Fail(f"BOT_TOKEN: required for {method}")
    async with httpx.AsyncClient(timeout=20) as client:
        try:
            return await BotApi(settings.bot_token, client, settings.telegram_api_root).call(method, params)
        except BotApiError as exc:
            raise _Fail(str(exc)) from exc


def _set_webhook(settings: Settings, args: argparse.Namespace) -> int:
    url = args.url or settings.webhook_url
    if url is None:
        raise _Fail("WEBHOOK_URL: required for set-webhook (the public https URL of /webhook), or pass --url")
    params = {
        "url": url,
        "secret_token": settings.webhook_secret,
        "max_connections": args.max_connections,
        # Only the kinds the app's handlers receive: Telegram sends nothing else, saving traffic both ways.
        "allowed_updates": _app(settings, args).allowed_updates(),
        "drop_pending_updates": args.drop_pending_updates,
    }
    asyncio.run(_call(settings, "setWebhook", params))
    print(f"webhook set to {url}")
    return 0


def _webhook_info(settings: Settings, args: argparse.Namespace) -> int:
    info = asyncio.run(_call(settings, "getWebhookInfo", {}))
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


def _delete_webhook(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(_call(settings, "deleteWebhook", {"drop_pending_updates": args.drop_pending_updates}))
    print("webhook deleted")
    return 0


async def _poll_forever(settings: Settings, bot: Bot[Any]) -> None:
    async with start(settings, bot=bot) as runtime:
        assert runtime.api is not None
        log.info("polling for updates as @%s (Ctrl-C to stop)", runtime.me.username)
        offset = 0
        allowed_updates = bot.allowed_updates()
        while True:
            try:
                raw = await runtime.api.call(
                    "getUpdates", {"offset": offset, "timeout": 5, "allowed_updates": allowed_updates}
                )
            except BotApiError as exc:
                if exc.error_code == 409:
                    raise _Fail(
                        "getUpdates: a webhook is set; run `python -m bot delete-webhook` first"
                    ) from exc
                log.warning("getUpdates failed: %s", exc)
                await asyncio.sleep(exc.retry_after or 2)
                continue
            for item in raw:
                try:
                    update = decode_update(msgspec.json.encode(item))
                except InvalidUpdate as exc:
                    log.warning("skipping an update that does not decode: %s", exc)
                    offset = max(offset, int(item.get("update_id", offset - 1)) + 1)
                    continue
                # Offset moves past an update only once it is committed: a database outage means the
                # same update again, as with a webhook's 503.
                while True:
                    try:
                        outcome = await runtime.pipeline.process(update)
                        break
                    except StorageUnavailable as exc:
                        log.warning("update %d not applied, retrying: %s", update.update_id, exc)
                        await asyncio.sleep(1)
                runtime.outbox.send_soon(outcome.to_send)
                offset = update.update_id + 1


def _poll(settings: Settings, args: argparse.Namespace) -> int:
    if settings.bot_token is None:
        raise _Fail("BOT_TOKEN: required for poll (it asks Telegram for updates)")
    bot = _app(settings, args)
    with _database(settings, bot.name) as settings, contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_poll_forever(settings, bot))
    return 0


def _chat(settings: Settings, args: argparse.Namespace) -> int:
    from .playground.terminal import ChatError, run

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104
    try:
        run(args, f"http://{host}:{settings.port}")
    except ChatError as exc:
        raise _Fail(str(exc)) from exc
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bot", description="Run a Telegram bot with exactly-once sessions in PostgreSQL."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    app = argparse.ArgumentParser(add_help=False)
    app.add_argument(
        "--app", metavar="MODULE:FACTORY", help=f"the bot to run (default: APP, else {DEFAULT_APP})"
    )
    serve = sub.add_parser(
        "serve", parents=[app], help="serve the webhook (no DATABASE_URL: a local embedded PostgreSQL)"
    )
    serve.add_argument("--host", help="interface to listen on (default: HOST, else 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: PORT, else 8000)")
    serve.add_argument(
        "--skip-migration-check", action="store_true", help="start even if the database looks unmigrated"
    )
    sub.add_parser("migrate", parents=[app], help="apply migrations/*.sql to DATABASE_URL")
    hook = sub.add_parser(
        "set-webhook",
        parents=[app],
        help="point Telegram at WEBHOOK_URL with WEBHOOK_SECRET, for the update kinds the app handles",
    )
    hook.add_argument("--url", help="overrides WEBHOOK_URL")
    hook.add_argument(
        "--max-connections", type=int, default=40, help="Telegram's parallel deliveries (1-100)"
    )
    hook.add_argument("--drop-pending-updates", action="store_true")
    sub.add_parser("webhook-info", help="print Telegram's getWebhookInfo")
    delete = sub.add_parser("delete-webhook", help="stop webhook delivery (needed before poll)")
    delete.add_argument("--drop-pending-updates", action="store_true")
    sub.add_parser(
        "poll", parents=[app], help="long-poll getUpdates instead of serving a webhook (local use)"
    )
    chat = sub.add_parser("chat", help="talk to a running local bot from this terminal (its playground)")
    chat.add_argument("--chat-type", choices=["group", "supergroup", "private", "channel"], default="group")
    chat.add_argument("--chat-id", type=int, help="continue a chat made before (its id was printed)")
    chat.add_argument("--title", default="Terminal chat")
    chat.add_argument("--as", dest="sender", default="Ann", help="who is typing: Ann, Bob or Cleo")
    chat.add_argument("--url", help="the bot (default: http://HOST:PORT, else http://127.0.0.1:8000)")
    return parser


_COMMANDS = {
    "serve": _serve,
    "migrate": _migrate,
    "set-webhook": _set_webhook,
    "webhook-info": _webhook_info,
    "delete-webhook": _delete_webhook,
    "poll": _poll,
    "chat": _chat,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"bot: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings)
    try:
        return _COMMANDS[args.command](settings, args)
    except (_Fail, StartupError, MigrationError, NotMigrated, StorageUnavailable) as exc:
        print(f"bot: {exc}", file=sys.stderr)
        return 1
