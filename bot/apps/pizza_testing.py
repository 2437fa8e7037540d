"""Updates the pizza bot's tests and benchmarks send: a 🍕 to count, and /hunger to ask."""

from __future__ import annotations

from typing import Any

from bot.testing.updates import command_update
from bot.types import Update

from .pizza import PIZZA

__all__ = ["PIZZA", "hunger"]


def hunger(update_id: int, chat_id: int, username: str | None = None, **kwargs: Any) -> Update:
    """`/hunger`, or `/hunger@username` when a username is given."""
    return command_update(update_id, chat_id, "hunger", username, **kwargs)
