from __future__ import annotations

import pytest

from bot.pooler import connect_options, transaction_pooler


@pytest.mark.parametrize(
    ("dsn", "pooled"),
    [
        ("postgresql://u:p@ep-cool-name-123456-pooler.us-east-2.aws.neon.tech/db", True),  # Neon, pooled
        ("postgresql://u:p@ep-cool-name-123456.us-east-2.aws.neon.tech/db", False),  # Neon, direct
        (
            "postgresql://u:p@aws-0-eu-west-1.pooler.supabase.com:6543/postgres",
            True,
        ),  # Supavisor, transaction
        ("postgresql://u:p@aws-0-eu-west-1.pooler.supabase.com:5432/postgres", False),  # Supavisor, session
        ("postgresql://u:p@db.abcdefgh.supabase.co:6543/postgres", True),  # Supabase's PgBouncer
        ("postgresql://u:p@db.abcdefgh.supabase.co:5432/postgres", False),  # Supabase, direct
        ("postgresql://u:p@localhost:6432/bot", True),  # PgBouncer's default port
        ("postgres://u:p@ec2-1-2-3-4.compute-1.amazonaws.com:5432/d1", False),  # Heroku, direct
        ("postgresql://postgres@/bot?host=/run/postgresql", False),  # a Unix socket
    ],
)
def test_auto_recognises_known_pooled_urls(dsn: str, pooled: bool) -> None:
    assert transaction_pooler(dsn) is pooled
    assert connect_options(dsn) == ({"statement_cache_size": 0} if pooled else {})


def test_an_explicit_mode_overrides_the_guess() -> None:
    assert transaction_pooler("postgresql://u@localhost:5432/bot", "transaction")
    assert not transaction_pooler("postgresql://u@localhost:6432/bot", "none")
