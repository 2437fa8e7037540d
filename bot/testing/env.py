"""The environment tests and benchmarks give the bot: a fixed token, secret and username."""

from __future__ import annotations

from ..config import Settings, load_settings

__all__ = ["FAULT_ENV", "SECRET", "TOKEN", "UNPACED_ENV", "USERNAME", "bot_env", "make_settings"]

TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
SECRET = "test-secret_0123456789"
USERNAME = "test_bot"

# For fault tests with processes: short leases and sweeps, so that the replies and timers a killed
# process held are taken over within the test.
FAULT_ENV = {
    "OUTBOX_LEASE": "1",
    "BOT_API_TIMEOUT": "0.9",
    "OUTBOX_SWEEP_INTERVAL": "0.2",
    "DB_POOL_MAX": "8",
    "LOG_LEVEL": "WARNING",
}

# For tests of a conversation rather than of the flood limits (test_outbox.py has those): Telegram's
# per-chat limits, kept by default, space one chat's replies after a short burst (3 s apart in a group at
# 20 a minute, 1 s in a private chat), which such a test would only wait out.
UNPACED_ENV = {"SEND_RATE_GROUP": "1000", "SEND_RATE_PRIVATE": "1000"}


def bot_env(database_url: str, telegram_root: str, **overrides: str) -> dict[str, str]:
    """Environment variables for a bot process (see README's configuration table)."""
    return {
        "BOT_TOKEN": TOKEN,
        "WEBHOOK_SECRET": SECRET,
        "DATABASE_URL": database_url,
        "TELEGRAM_API_ROOT": telegram_root,
        # serve registers it with the fake at start (and refuses to serve a token with no webhook at all).
        "WEBHOOK_URL": "https://bot.test/webhook",
        "OUTBOX_SWEEP_INTERVAL": "0.5",
        **overrides,
    }


def make_settings(database_url: str, telegram_root: str, **overrides: str) -> Settings:
    return load_settings(bot_env(database_url, telegram_root, **overrides))
