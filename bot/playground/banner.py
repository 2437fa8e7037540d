"""What `serve` prints when it starts a local trial: where to look, where the data is, how to go live."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from ..config import Settings

__all__ = ["describe_database", "trial_banner"]


def describe_database(settings: Settings, app_name: str) -> str:
    """Which database, without its password: the embedded one (and its folder, one per app) or
    DATABASE_URL's."""
    if settings.database_url is None:
        from ..embedded import default_data_dir

        return f"embedded PostgreSQL, data in {default_data_dir(settings.embedded_pg_dir, app_name)}"
    parts = urlsplit(settings.database_url)
    host = parts.hostname or parse_qs(parts.query).get("host", ["local socket"])[0]
    return f"DATABASE_URL, {host}{parts.path}"


def trial_banner(settings: Settings, host: str, port: int, database: str) -> str:
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104 (compared, not bound)
    if settings.playground:
        where = f"http://{shown_host}:{port}/  (or `python -m bot chat` in another terminal)"
    else:
        where = "off (PLAYGROUND=0): replies are logged, not sent"
    return "\n".join(
        (
            "",
            "  Local trial: no BOT_TOKEN, nothing leaves this machine",
            f"  Playground:  {where}",
            f"  Database:    {database}",
            "  Go live:     set BOT_TOKEN, WEBHOOK_SECRET and DATABASE_URL, then either",
            "               WEBHOOK_URL=https://<your host>/webhook python -m bot serve   (webhook)",
            "               or, with no public URL: python -m bot poll                  (long polling)",
            "",
        )
    )
