"""The conformance suite's checks of sessions and of the update claim (part of
`bot.testing.conformance.CHECKS`): what one update's transaction promises. Reads, writes and deletes
commit or roll back together, a key is held by one transaction at a time (a missing one too), an update
is claimed once, and sessions expire and move as told."""

from __future__ import annotations

import asyncio

from ..storage import Moved, OutgoingCall, StoredSession
from .conformance_tools import (
    WAIT_LIMIT,
    Boom,
    StorageFactory,
    holding,
    read_session,
    still_blocked,
    stored_data,
    write_session,
)

__all__ = [
    "a_claim_waits_for_the_first_attempt",
    "a_move_leaves_a_forward_until_it_expires",
    "a_read_of_a_missing_key_waits_too",
    "a_read_waits_for_the_holder_to_commit",
    "a_rolled_back_claim_can_be_claimed_again",
    "claim_update_once",
    "concurrent_claims_of_one_update_let_one_through",
    "concurrent_writers_on_one_key_serialize",
    "delete_removes",
    "overwrite_replaces",
    "prune_removes_expired_sessions",
    "read_missing_is_none",
    "rollback_discards_writes",
    "ttl_expires",
    "versions_are_kept",
    "write_then_read",
]


async def read_missing_is_none(make: StorageFactory) -> None:
    storage = await make()
    assert await read_session(storage, "nobody") is None, "a key never written reads as None"
    assert await read_session(storage, "nobody") is None, "reading a missing key creates nothing visible"


async def write_then_read(make: StorageFactory) -> None:
    storage = await make()
    await write_session(storage, "k", '{"n": 1}')
    assert await stored_data(storage, "k") == '{"n":1}', "a committed write is read back"


async def overwrite_replaces(make: StorageFactory) -> None:
    storage = await make()
    await write_session(storage, "k", '{"n": 1}')
    await write_session(storage, "k", '{"n": 2}')
    assert await stored_data(storage, "k") == '{"n":2}', "a second write replaces the first"


async def delete_removes(make: StorageFactory) -> None:
    storage = await make()
    await write_session(storage, "k", '{"n": 1}')
    async with storage.transaction() as tx:
        await tx.read("k")
        await tx.delete("k")
    assert await read_session(storage, "k") is None, "a deleted key reads as None"


async def versions_are_kept(make: StorageFactory) -> None:
    storage = await make()
    await write_session(storage, "k", '{"n": 1}', version=3)
    stored = await read_session(storage, "k")
    assert isinstance(stored, StoredSession)
    assert stored.version == 3, "the version is stored with the data"


async def rollback_discards_writes(make: StorageFactory) -> None:
    storage = await make()
    await write_session(storage, "k", '{"n": 1}')
    await write_session(storage, "gone", '{"n": 1}')
    try:
        async with storage.transaction() as tx:
            await tx.read("k")
            await tx.write("k", StoredSession('{"n": 99}'))
            await tx.read("gone")
            await tx.delete("gone")
            await tx.write("new", StoredSession('{"n": 1}'))
            await tx.enqueue(1, 1, [OutgoingCall("sendMessage", {"chat_id": 1, "text": "x"})], 0)
            raise Boom
    except Boom:
        pass
    assert await stored_data(storage, "k") == '{"n":1}', "a rolled-back write is discarded"
    assert await stored_data(storage, "gone") == '{"n":1}', "a rolled-back delete is discarded"
    assert await read_session(storage, "new") is None, "a rolled-back insert is discarded"
    assert await storage.claim_due(10, 30) == [], "rolled-back calls are not queued"


async def concurrent_writers_on_one_key_serialize(make: StorageFactory) -> None:
    """N read-increment-write transactions at once on a key that does not exist yet: all N survive."""
    storage = await make()

    async def increment() -> None:
        async with storage.transaction() as tx:
            stored = await tx.read("hot")
            assert not isinstance(stored, Moved), "nothing moved this key"
            n = 0 if stored is None else int(stored.data.split(":")[1].strip(" }"))
            await asyncio.sleep(0)  # let the others run between our read and write
            await tx.write("hot", StoredSession(f'{{"n": {n + 1}}}'))

    await asyncio.wait_for(asyncio.gather(*(increment() for _ in range(50))), WAIT_LIMIT * 2)
    assert await stored_data(storage, "hot") == '{"n":50}', (
        "concurrent read-increment-writes lose no increment"
    )


async def a_read_waits_for_the_holder_to_commit(make: StorageFactory) -> None:
    storage = await make()
    await write_session(storage, "k", '{"by": "setup"}')
    async with holding(storage, lambda tx: tx.read("k")) as holder, storage.transaction() as tx:
        reading = asyncio.ensure_future(tx.read("k"))
        await still_blocked(reading, "a read waits while another transaction holds the key")
        await holder.finish(lambda tx: tx.write("k", StoredSession('{"by": "holder"}')))
        stored = await asyncio.wait_for(reading, WAIT_LIMIT)
        assert isinstance(stored, StoredSession)
        assert "holder" in stored.data, "after the holder commits, the waiting read sees its write"


async def a_read_of_a_missing_key_waits_too(make: StorageFactory) -> None:
    """The first two updates of a new chat must take turns like any others, though there is no row."""
    storage = await make()
    async with holding(storage, lambda tx: tx.read("new")) as holder, storage.transaction() as tx:
        assert holder.result is None
        reading = asyncio.ensure_future(tx.read("new"))
        await still_blocked(reading, "a read of a missing key waits while another transaction holds it")
        await holder.finish(lambda tx: tx.write("new", StoredSession('{"by": "holder"}')))
        stored = await asyncio.wait_for(reading, WAIT_LIMIT)
        assert stored is not None, "after the holder commits, the waiting read sees what it created"


async def claim_update_once(make: StorageFactory) -> None:
    storage = await make()
    async with storage.transaction() as tx:
        assert await tx.claim_update(7, 100), "the first claim of an update succeeds"
    async with storage.transaction() as tx:
        assert not await tx.claim_update(7, 100), "a committed claim cannot be made again"
        assert await tx.claim_update(8, 100), "another bot's update 100 is another update"


async def a_rolled_back_claim_can_be_claimed_again(make: StorageFactory) -> None:
    storage = await make()
    try:
        async with storage.transaction() as tx:
            assert await tx.claim_update(1, 1)
            raise Boom
    except Boom:
        pass
    async with storage.transaction() as tx:
        assert await tx.claim_update(1, 1), "a rolled-back claim leaves nothing behind"


async def concurrent_claims_of_one_update_let_one_through(make: StorageFactory) -> None:
    storage = await make()

    async def claim() -> bool:
        async with storage.transaction() as tx:
            claimed = await tx.claim_update(1, 42)
            await asyncio.sleep(0.01)
            return claimed

    claims = await asyncio.wait_for(asyncio.gather(*(claim() for _ in range(10))), WAIT_LIMIT)
    assert sorted(claims) == [False] * 9 + [True], "of concurrent claims of one update, exactly one wins"


async def a_claim_waits_for_the_first_attempt(make: StorageFactory) -> None:
    """A redelivery overlapping a slow first attempt waits for it, and takes over if it rolls back."""
    storage = await make()
    async with holding(storage, lambda tx: tx.claim_update(1, 7)) as first, storage.transaction() as tx:
        assert first.result is True
        second = asyncio.ensure_future(tx.claim_update(1, 7))
        await still_blocked(second, "a second claim of an update waits for the first to end")
        await first.finish(commit=False)
        assert await asyncio.wait_for(second, WAIT_LIMIT), "the first attempt rolled back: the second wins"
    async with storage.transaction() as tx:
        assert not await tx.claim_update(1, 7), "the second attempt's claim was committed"


async def ttl_expires(make: StorageFactory) -> None:
    storage = await make()
    await write_session(storage, "brief", '{"n": 1}', ttl=0.3)
    await write_session(storage, "lasting", '{"n": 1}')
    await write_session(storage, "renewed", '{"n": 1}', ttl=0.3)
    await write_session(storage, "renewed", '{"n": 2}')
    assert await read_session(storage, "brief") is not None, "a session is there until its ttl runs out"
    await asyncio.sleep(0.6)
    assert await read_session(storage, "brief") is None, "an expired session reads as None"
    assert await read_session(storage, "lasting") is not None, "a session written without ttl does not expire"
    assert await stored_data(storage, "renewed") == '{"n":2}', "a write without ttl clears an earlier expiry"


async def prune_removes_expired_sessions(make: StorageFactory) -> None:
    storage = await make()
    await write_session(storage, "brief", '{"n": 1}', ttl=0.2)
    await write_session(storage, "lasting", '{"n": 1}')
    await asyncio.sleep(0.4)
    assert await storage.prune(keep_updates=3600, keep_sent=3600) == 1, "prune deletes the expired session"
    assert await storage.prune(keep_updates=3600, keep_sent=3600) == 0, "and it is gone"
    assert await read_session(storage, "lasting") is not None, "prune keeps sessions that have not expired"


async def a_move_leaves_a_forward_until_it_expires(make: StorageFactory) -> None:
    storage = await make()
    await write_session(storage, "old", '{"n": 1}')
    async with storage.transaction() as tx:
        await tx.read("old")
        await tx.move("old", "new", 0.3)
    assert await read_session(storage, "old") == Moved("new"), "a moved key reads as a forward to the new key"
    await asyncio.sleep(0.4)
    assert await read_session(storage, "old") is None, "a forward reads as missing once `keep` has passed"
    assert await storage.prune(3600, 3600) == 1, "prune removes an expired forward"
    async with storage.transaction() as tx:
        await tx.read("again")
        await tx.move("again", "new", 60)
    await write_session(storage, "again", '{"n": 2}')
    assert await stored_data(storage, "again") == '{"n":2}', "a write replaces a forward"
