"""Logging for the whole process, uvicorn's lines included: readable text by default, or one JSON
object per line (LOG_FORMAT=json) for a log service.

A JSON line has time, level, logger and message, plus update_id, chat, outcome and duration (seconds)
when the line is about one update or one reply, and error with the traceback when there is one. Every
line, in either format, has the bot token, the webhook secret and the database password replaced by
"***" before it is written: a secret that reaches a log line by way of an exception's text (a URL, a
DSN) is still not written.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

from .config import Settings

__all__ = ["JsonFormatter", "TextFormatter", "secrets_of", "setup_logging"]

# The `extra=` fields the framework attaches to a record, in the order a JSON line shows them.
FIELDS = ("update_id", "chat", "outcome", "duration")


class _Redacting(logging.Formatter):
    def __init__(self, secrets: Iterable[str], fmt: str | None = None) -> None:
        super().__init__(fmt)
        # Longest first, so a secret containing another is replaced whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


class TextFormatter(_Redacting):
    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__(secrets, "%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(_Redacting):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(line, ensure_ascii=False, default=str))


def secrets_of(settings: Settings) -> list[str]:
    """What must never be written: the token, the webhook secret, the database password."""
    found = [settings.bot_token or "", settings.webhook_secret]
    if settings.database_url:
        found.append(urlsplit(settings.database_url).password or "")
    return found


def setup_logging(settings: Settings) -> None:
    """One handler on the root logger, to stderr; uvicorn is run with log_config=None to use it too."""
    secrets = secrets_of(settings)
    if settings.webhook_secret_generated:
        # The local trial prints its one-time secret on purpose: it is how the user gets it.
        secrets.remove(settings.webhook_secret)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if settings.log_format == "json" else TextFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    logging.captureWarnings(True)  # Python's warnings too, so every line is in the chosen format
    # httpx logs every request URL at INFO, and Bot API URLs contain the token (redacted all the same).
    logging.getLogger("httpx").setLevel(logging.WARNING)
