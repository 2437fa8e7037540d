"""bot/libpq.py: libpq URL parameters asyncpg does not know are left out (with a note) or refused."""

from __future__ import annotations

import pytest

from bot.config import ConfigError, load_settings
from bot.libpq import UnsupportedParameter, for_asyncpg

NEON = "postgresql://alex:pw@ep-cool-1a2b-pooler.eu-central-1.aws.neon.tech/neondb"


@pytest.mark.parametrize(
    ("url", "cleaned", "left_out"),
    [
        # Neon's default connection string.
        (f"{NEON}?sslmode=require&channel_binding=require", f"{NEON}?sslmode=require", ["channel_binding"]),
        (
            f"{NEON}?connect_timeout=10&sslmode=require&keepalives=1",
            f"{NEON}?sslmode=require",
            ["connect_timeout", "keepalives"],
        ),
        # Server settings and what asyncpg reads pass untouched (and the URL is returned as given).
        (f"{NEON}?sslmode=require&application_name=x&options=-c%20search_path%3Dapp", None, []),
        ("postgresql://u@/db?host=/tmp/socket", None, []),
        (f"{NEON}?gssencmode=prefer", NEON, ["gssencmode"]),
    ],
)
def test_libpq_only_parameters_are_left_out_with_a_note_each(
    url: str, cleaned: str | None, left_out: list[str]
) -> None:
    result, notes = for_asyncpg(url)
    assert result == (cleaned or url)
    assert [note.split("=", 1)[0] for note in notes] == left_out


@pytest.mark.parametrize(
    "parameter", ["hostaddr=10.0.0.1", "require_auth=scram-sha-256", "gssencmode=require"]
)
def test_what_asyncpg_cannot_honour_and_must_not_drop_is_refused(parameter: str) -> None:
    with pytest.raises(UnsupportedParameter, match=parameter.split("=")[0]):
        for_asyncpg(f"{NEON}?{parameter}")


def test_the_settings_carry_the_cleaned_url_and_the_notes() -> None:
    settings = load_settings({"DATABASE_URL": f"{NEON}?sslmode=require&channel_binding=require"})
    assert settings.database_url == f"{NEON}?sslmode=require"
    [note] = settings.database_notes
    assert note.startswith(
        "DATABASE_URL: channel_binding=require left out: asyncpg has no SCRAM channel binding"
    )
    with pytest.raises(ConfigError, match=r"^DATABASE_DIRECT_URL: hostaddr is not supported"):
        load_settings({"DATABASE_DIRECT_URL": f"{NEON}?hostaddr=10.0.0.1"})
