"""Both storages pass the conformance suite that third-party adapters can run too."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from bot.storage import Storage
from bot.testing.conformance import CHECKS, StorageFactory

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
async def test_storage_keeps_the_contract(
    storage: Storage, check: Callable[[StorageFactory], Awaitable[None]]
) -> None:
    async def make() -> Storage:
        return storage

    await check(make)
