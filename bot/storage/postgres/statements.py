"""What every part of the PostgreSQL storage needs to run a statement: numbered parameters, a session
row's columns, and one translation of driver failures into the storage's answers: StorageUnavailable
(503, Telegram delivers the update again) or StorageRefused (a value the database refuses on every
delivery: a dead letter)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import asyncpg

from .. import StorageRefused, StorageUnavailable

__all__ = ["Args", "session_columns", "unavailable_on_failure"]

# What the database refuses in a value, whenever it is sent: data exceptions (class 22: jsonb and text
# refusing NUL, numbers out of range...), values over its limits (class 54: a key too long for the index,
# a jsonb over 255 MB), and arguments asyncpg cannot encode. The same value is refused on every delivery.
_REFUSED = (asyncpg.DataError, asyncpg.ProgramLimitExceededError, asyncpg.exceptions._base.DataError)


class unavailable_on_failure:  # (lower case: used as the context manager function it was)
    """Whatever else the driver raises here (a lost connection, a timeout, a terminated backend, a
    protocol state error after one, a missing table), the update was not stored. Reporting it as
    StorageUnavailable makes the webhook answer 503 and Telegram deliver the update again; treating it
    as a bug would dead-letter an update that its next delivery would apply. A refused value is
    StorageRefused: delivering it again cannot help (the update becomes a dead letter).

    A class, not a @contextmanager: every statement of every update passes through one, and the
    generator's machinery cost more than the translation."""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if (
            exc is None
            or not isinstance(exc, Exception)
            or isinstance(exc, (StorageUnavailable, StorageRefused))
        ):
            return
        what = self._what
        if isinstance(exc, _REFUSED):
            raise StorageRefused(
                f"{what}: the database refused a value: {type(exc).__name__}: {exc}"
            ) from exc
        raise StorageUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc


class Args:
    """Numbered parameters ($1, $2, ...) for a statement assembled from parts."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def session_columns(table: str = "") -> str:
    """A session row as both transactions read it, its columns qualified by `table` ("s." or none)."""
    return f"{table}data::text AS data, {table}version, {table}expires_at <= now() AS expired"
