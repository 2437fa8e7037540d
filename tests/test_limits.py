from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bot.limits import TooLarge, read_at_most


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.anyio
async def test_a_stream_up_to_the_limit_is_read_whole() -> None:
    assert await read_at_most(_chunks(b"ab", b"", b"cd"), 4) == b"abcd"


@pytest.mark.anyio
async def test_one_byte_past_the_limit_is_refused_before_the_rest_is_read() -> None:
    read: list[bytes] = []

    async def endless() -> AsyncIterator[bytes]:
        while True:
            read.append(b"xx")
            yield b"xx"

    with pytest.raises(TooLarge):
        await read_at_most(endless(), 5)
    assert len(read) == 3
