"""A conformance suite for session storages: what MemoryStorage and PostgresStorage both promise.

Any adapter can run it. Each check is an async function taking a factory that returns a fresh, empty
storage; it raises AssertionError when the storage breaks the contract. From pytest:

    import pytest
    from bot.testing.conformance import CHECKS

    @pytest.mark.anyio
    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    async def test_my_storage(check):
        await check(make_my_empty_storage)

`make_my_empty_storage` is an async function returning a storage with nothing in it; each check calls
it once. `tests/test_storage_conformance.py` runs the suite against both of our storages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..storage import OutgoingCall, Storage, StoredSession

__all__ = ["CHECKS", "StorageFactory"]

StorageFactory = Callable[[], Awaitable[Storage]]


class _Boom(Exception):
    pass


async def _read(storage: Storage, key: str) -> StoredSession | None:
    async with storage.transaction() as tx:
        return await tx.read(key)


async def _data(storage: Storage, key: str) -> str | None:
    """The stored JSON without spaces (PostgreSQL's jsonb adds its own)."""
    stored = await _read(storage, key)
    return None if stored is None else stored.data.replace(" ", "")


async def _write(storage: Storage, key: str, data: str, version: int = 0, ttl: float | None = None) -> None:
    async with storage.transaction() as tx:
        await tx.read(key)
        await tx.write(key, StoredSession(data, version), ttl)


async def read_missing_is_none(make: StorageFactory) -> None:
    storage = await make()
    assert await _read(storage, "nobody") is None
    assert await _read(storage, "nobody") is None  # reading creates nothing visible


async def write_then_read(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "k", '{"n": 1}')
    assert await _data(storage, "k") == '{"n":1}'


async def overwrite_replaces(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "k", '{"n": 1}')
    await _write(storage, "k", '{"n": 2}')
    assert await _data(storage, "k") == '{"n":2}'


async def delete_removes(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "k", '{"n": 1}')
    async with storage.transaction() as tx:
        await tx.read("k")
        await tx.delete("k")
    assert await _read(storage, "k") is None


async def versions_are_kept(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "k", '{"n": 1}', version=3)
    stored = await _read(storage, "k")
    assert stored is not None
    assert stored.version == 3


async def rollback_discards_writes(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "k", '{"n": 1}')
    try:
        async with storage.transaction() as tx:
            await tx.read("k")
            await tx.write("k", StoredSession('{"n": 99}'))
            await tx.claim_update(1, 1)
            await tx.enqueue(1, 1, [OutgoingCall("sendMessage", {"chat_id": 1, "text": "x"})], 0)
            raise _Boom
    except _Boom:
        pass
    assert await _data(storage, "k") == '{"n":1}'
    async with storage.transaction() as tx:
        assert await tx.claim_update(1, 1)  # the rolled-back claim left nothing behind
    assert await storage.claim_due(10, 30) == []


async def concurrent_writers_on_one_key_serialize(make: StorageFactory) -> None:
    """N read-increment-write transactions at once: every increment survives."""
    storage = await make()

    async def increment() -> None:
        async with storage.transaction() as tx:
            stored = await tx.read("hot")
            n = 0 if stored is None else int(stored.data.split(":")[1].strip(" }"))
            await asyncio.sleep(0)  # let the others run between our read and write
            await tx.write("hot", StoredSession(f'{{"n": {n + 1}}}'))

    await asyncio.gather(*(increment() for _ in range(50)))
    assert await _data(storage, "hot") == '{"n":50}'


async def a_read_waits_for_the_holder_to_commit(make: StorageFactory) -> None:
    storage = await make()
    holder_has_read = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with storage.transaction() as tx:
            await tx.read("k")
            holder_has_read.set()
            await release.wait()
            await tx.write("k", StoredSession('{"by": "holder"}'))

    task = asyncio.create_task(holder())
    await holder_has_read.wait()
    async with storage.transaction() as tx:
        reading = asyncio.ensure_future(tx.read("k"))
        await asyncio.sleep(0.2)
        assert not reading.done()  # blocked on the holder's lock
        release.set()
        stored = await reading
        assert stored is not None
        assert "holder" in stored.data  # and then sees the holder's committed write
    await task


async def claim_update_once(make: StorageFactory) -> None:
    storage = await make()
    async with storage.transaction() as tx:
        assert await tx.claim_update(7, 100)
    async with storage.transaction() as tx:
        assert not await tx.claim_update(7, 100)
        assert await tx.claim_update(8, 100)  # another bot's update 100 is another update


async def concurrent_claims_of_one_update_let_one_through(make: StorageFactory) -> None:
    storage = await make()

    async def claim() -> bool:
        async with storage.transaction() as tx:
            claimed = await tx.claim_update(1, 42)
            await asyncio.sleep(0.01)
            return claimed

    assert sorted(await asyncio.gather(*(claim() for _ in range(10)))) == [False] * 9 + [True]


async def ttl_expires_and_prune_removes(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "brief", '{"n": 1}', ttl=0.3)
    await _write(storage, "lasting", '{"n": 1}')
    assert await _read(storage, "brief") is not None
    await asyncio.sleep(0.6)
    assert await _read(storage, "brief") is None
    assert await _read(storage, "lasting") is not None
    assert await storage.prune(keep_updates=3600, keep_sent=3600) >= 1
    assert await _read(storage, "lasting") is not None


async def outbox_leases_and_confirmations(make: StorageFactory) -> None:
    storage = await make()
    calls = [OutgoingCall("sendMessage", {"chat_id": 1, "text": str(n)}) for n in range(3)]
    async with storage.transaction() as tx:
        pending = await tx.enqueue(5, 9, calls, lease=0.3)
    assert [p.params["text"] for p in pending] == ["0", "1", "2"]
    assert await storage.claim_due(10, 30) == []  # leased to the sender
    async with storage.transaction() as tx:
        assert await tx.claim_unsent(5, 9, 30) == []  # a redelivery does not take over a live lease
    await storage.mark_sent(pending[0].id)
    await storage.mark_failed(pending[1].id, "chat not found", retry_in=None)
    await asyncio.sleep(0.5)
    async with storage.transaction() as tx:
        retaken = await tx.claim_unsent(5, 9, 30)
    assert [p.params["text"] for p in retaken] == ["2"]  # only the one nobody confirmed or gave up on
    await storage.mark_failed(retaken[0].id, "flood", retry_in=0.2)
    await asyncio.sleep(0.4)
    due = await storage.claim_due(10, 30)
    assert [p.params["text"] for p in due] == ["2"]
    assert await storage.claim_due(10, 30) == []  # leased again by that claim


CHECKS: list[Callable[[StorageFactory], Awaitable[None]]] = [
    read_missing_is_none,
    write_then_read,
    overwrite_replaces,
    delete_removes,
    versions_are_kept,
    rollback_discards_writes,
    concurrent_writers_on_one_key_serialize,
    a_read_waits_for_the_holder_to_commit,
    claim_update_once,
    concurrent_claims_of_one_update_let_one_through,
    ttl_expires_and_prune_removes,
    outbox_leases_and_confirmations,
]
