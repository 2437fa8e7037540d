"""The environment tests and benchmarks give the bot: a fixed token, secret and username."""

from __future__ import annotations

from ..config import Settings, load_settings

__all__ = ["FAULT_ENV", "SECRET", "TOKEN", "USERNAME", "bot_env", "make_settings"]

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
