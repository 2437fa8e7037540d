"""`python -m bot <command>` (also installed as `bot`): serve, migrate, poll, chat, webhook management, and
the dead letters (list, replay).

Errors a user can fix (configuration, an unmigrated or unreachable database,
Telegram refusing the token or the URL) end the process with one line on stderr and a non-zero status,
never a traceback.

This module is the command line itself: its arguments, what each command needs from the configuration,
and how a failure ends the process. The commands live beside it, one module per group: `serve` (serve,
migrate), `webhook` (set-webhook, webhook-info, delete-webhook), `local` (poll, chat), `dead_letters`
(dead-letters, replay), on what `base` gives them all.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..config import DEFAULT_APP, ConfigError, Settings, load_settings
from ..failures import TryLater
from ..logs import setup_logging
from ..migrate import MigrationError, NotMigrated
from ..runtime import StartupError
from ..storage import StorageUnavailable
from .base import Fail, log
from .dead_letters import dead_letters, replay
from .local import chat, poll
from .serve import migrate_command, serve
from .webhook import delete_webhook, set_webhook, webhook_info

__all__ = ["main"]


def _port(value: str) -> int:
    """--port as PORT is checked: past 65535, uvicorn's bind would end in a traceback."""
    if not (value.isdigit() and 1 <= int(value) <= 65535):
        raise argparse.ArgumentTypeError(f"not a port number from 1 to 65535: {value!r}")
    return int(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bot", description="Run a Telegram bot with exactly-once sessions in PostgreSQL."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    app = argparse.ArgumentParser(add_help=False)
    app.add_argument(
        "--app", metavar="MODULE:FACTORY", help=f"the bot to run (default: APP, else {DEFAULT_APP})"
    )
    serve_cmd = sub.add_parser(
        "serve",
        parents=[app],
        help="serve the webhook, registering it with Telegram when WEBHOOK_URL is known"
        " (no DATABASE_URL: a local embedded PostgreSQL)",
    )
    serve_cmd.add_argument("--host", help="interface to listen on (default: HOST, else 127.0.0.1)")
    serve_cmd.add_argument("--port", type=_port, help="port (default: PORT, else 8000)")
    serve_cmd.add_argument(
        "--skip-migration-check", action="store_true", help="start even if the database looks unmigrated"
    )
    sub.add_parser(
        "migrate",
        parents=[app],
        help="apply the migrations to DATABASE_DIRECT_URL, else DATABASE_URL (needs nothing else)",
    )
    hook_cmd = sub.add_parser(
        "set-webhook",
        parents=[app],
        help="point Telegram at WEBHOOK_URL with WEBHOOK_SECRET, for the update kinds the app handles",
    )
    hook_cmd.add_argument("--url", help="overrides WEBHOOK_URL")
    hook_cmd.add_argument(
        "--max-connections",
        type=int,
        help="Telegram's parallel deliveries, 1-100 (default: WEBHOOK_MAX_CONNECTIONS)",
    )
    hook_cmd.add_argument("--drop-pending-updates", action="store_true")
    sub.add_parser(
        "webhook-info", parents=[app], help="print Telegram's getWebhookInfo and flag what is wrong with it"
    )
    delete_cmd = sub.add_parser("delete-webhook", help="stop webhook delivery (needed before poll)")
    delete_cmd.add_argument("--drop-pending-updates", action="store_true")
    sub.add_parser(
        "poll", parents=[app], help="long-poll getUpdates instead of serving a webhook (local use)"
    )
    letters_cmd = sub.add_parser(
        "dead-letters",
        parents=[app],
        help="list the updates that failed for good (a bug, a value that cannot be stored); with an"
        " UPDATE_ID, show one in full: the update, the error and its traceback",
    )
    letters_cmd.add_argument("update_id", metavar="UPDATE_ID", type=int, nargs="?")
    replay_cmd = sub.add_parser(
        "replay",
        parents=[app],
        help="run dead letters again, once the code is fixed: each is applied once and removed from the"
        " list, or stays listed if it fails again (exit status 1)",
    )
    which = replay_cmd.add_mutually_exclusive_group(required=True)
    which.add_argument("update_id", metavar="UPDATE_ID", type=int, nargs="?")
    which.add_argument("--all", action="store_true", help="every dead letter, oldest first")
    chat_cmd = sub.add_parser(
        "chat",
        help="talk to a running local bot from this terminal (its playground); !N presses inline button N",
    )
    chat_cmd.add_argument(
        "--chat-type", choices=["group", "supergroup", "private", "channel"], default="group"
    )
    chat_cmd.add_argument("--chat-id", type=int, help="continue a chat made before (its id was printed)")
    chat_cmd.add_argument("--title", default="Terminal chat")
    chat_cmd.add_argument("--as", dest="sender", default="Ann", help="who is typing: Ann, Bob or Cleo")
    chat_cmd.add_argument("--url", help="the bot (default: http://HOST:PORT, else http://127.0.0.1:8000)")
    return parser


# Each command, and what it needs besides BOT_TOKEN: (a WEBHOOK_SECRET, a DATABASE_URL).
_COMMANDS: dict[str, tuple[Callable[[Settings, argparse.Namespace], int], bool, bool]] = {
    "serve": (serve, True, True),
    "migrate": (migrate_command, False, True),
    "set-webhook": (set_webhook, True, False),
    "webhook-info": (webhook_info, False, False),
    "delete-webhook": (delete_webhook, False, False),
    "poll": (poll, False, True),
    "dead-letters": (dead_letters, False, True),
    "replay": (replay, False, True),
    "chat": (chat, False, False),
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
    except (Fail, StartupError, MigrationError, NotMigrated, StorageUnavailable, TryLater) as exc:
        print(f"bot: {exc}", file=sys.stderr)
        return 1
