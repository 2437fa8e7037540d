"""Reading a stream of bytes without trusting its length: what the Bot API client reads back. (The
webhook reads its body straight from ASGI messages, with the same bound: `bot.app`.)"""

from __future__ import annotations

from collections.abc import AsyncIterable

from .errors import BotError

__all__ = ["TooLarge", "read_at_most"]


class TooLarge(BotError):
    """The stream passed its limit; what was read so far is dropped."""


async def read_at_most(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """The whole stream, given up on as soon as it passes `limit` bytes: a huge body is never held."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise TooLarge
        parts.append(chunk)
    return b"".join(parts)
