"""The environment tests and benchmarks give the bot: a fixed token, secret and username."""

from __future__ import annotations

from ..config import Settings, load_settings

__all__ = ["SECRET", "TOKEN", "USERNAME", "bot_env", "make_settings"]

TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
SECRET = "test-secret_0123456789"
USERNAME = "test_bot"


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
