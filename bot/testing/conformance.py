"""A conformance suite for session storages: what MemoryStorage and PostgresStorage both promise.

Any adapter can run it, with or without pytest. Each check is an async function taking a factory that
returns a fresh, empty storage (each check calls it once); it raises AssertionError, with the promise it
saw broken, when the storage breaks the contract. With pytest (and the anyio plugin):

    import pytest
    from bot.testing.conformance import CHECKS

    @pytest.mark.anyio
    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    async def test_my_storage(check):
        async def make():
            return await MyStorage.connect(...)  # empty
        await check(make)

Without it: `failures = await run_checks(make)` returns the failed checks by name (empty: it conforms),
each bounded by a timeout so that a storage that deadlocks fails instead of hanging.
`tests/test_storage_conformance.py` runs the suite against both of our storages, and shows that it
catches a storage without locks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from ..files import Upload
from ..storage import Budget, DeadLetter, FloodRule, Moved, OutgoingCall, Storage, StoredSession, Transaction
from .conformance_timers import TIMER_CHECKS

__all__ = ["CHECKS", "Check", "StorageFactory", "run_checks"]

StorageFactory = Callable[[], Awaitable[Storage]]
Check = Callable[[StorageFactory], Awaitable[None]]

# How long a blocked call is watched to be sure it is blocked, and how long any single wait may take.
BLOCKED_FOR = 0.2
WAIT_LIMIT = 5.0


class _Boom(Exception):
    pass


async def _read(storage: Storage, key: str) -> StoredSession | Moved | None:
    async with storage.transaction() as tx:
        return await tx.read(key)


async def _data(storage: Storage, key: str) -> str | None:
    """The stored JSON without spaces (PostgreSQL's jsonb adds its own)."""
    stored = await _read(storage, key)
    if isinstance(stored, Moved):
        return f"moved to {stored.key}"
    return None if stored is None else stored.data.replace(" ", "")


async def _write(storage: Storage, key: str, data: str, version: int = 0, ttl: float | None = None) -> None:
    async with storage.transaction() as tx:
        await tx.read(key)
        await tx.write(key, StoredSession(data, version), ttl)


class _Holder:
    """A transaction, in its own task, that takes a lock and keeps it until `finish()`."""

    def __init__(self, storage: Storage, lock: Callable[[Transaction], Awaitable[Any]]) -> None:
        self.locked = asyncio.Event()
        self.result: Any = None
        self._go = asyncio.Event()
        self._then: Callable[[Transaction], Awaitable[None]] | None = None
        self._commit = True
        self._task = asyncio.create_task(self._run(storage, lock))

    async def _run(self, storage: Storage, lock: Callable[[Transaction], Awaitable[Any]]) -> None:
        try:
            async with storage.transaction() as tx:
                self.result = await lock(tx)
                self.locked.set()
                await self._go.wait()
                if self._then is not None:
                    await self._then(tx)
                if not self._commit:
                    raise _Boom
        except _Boom:
            pass

    async def finish(
        self, then: Callable[[Transaction], Awaitable[None]] | None = None, *, commit: bool = True
    ) -> None:
        """Do `then` in the holder's transaction, commit it (or roll it back), and wait until it has."""
        if not self._go.is_set():
            self._then, self._commit = then, commit
            self._go.set()
        await asyncio.wait_for(asyncio.shield(self._task), WAIT_LIMIT)


@asynccontextmanager
async def _holding(storage: Storage, lock: Callable[[Transaction], Awaitable[Any]]) -> AsyncIterator[_Holder]:
    holder = _Holder(storage, lock)
    try:
        await asyncio.wait_for(holder.locked.wait(), WAIT_LIMIT)
        yield holder
    finally:
        # A failed check still ends the holder's transaction, so no lock or task outlives the check.
        try:
            await holder.finish(commit=False)
        finally:
            holder._task.cancel()


async def _still_blocked(call: asyncio.Future[Any], promise: str) -> None:
    await asyncio.sleep(BLOCKED_FOR)
    assert not call.done(), promise


async def read_missing_is_none(make: StorageFactory) -> None:
    storage = await make()
    assert await _read(storage, "nobody") is None, "a key never written reads as None"
    assert await _read(storage, "nobody") is None, "reading a missing key creates nothing visible"


async def write_then_read(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "k", '{"n": 1}')
    assert await _data(storage, "k") == '{"n":1}', "a committed write is read back"


async def overwrite_replaces(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "k", '{"n": 1}')
    await _write(storage, "k", '{"n": 2}')
    assert await _data(storage, "k") == '{"n":2}', "a second write replaces the first"


async def delete_removes(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "k", '{"n": 1}')
    async with storage.transaction() as tx:
        await tx.read("k")
        await tx.delete("k")
    assert await _read(storage, "k") is None, "a deleted key reads as None"


async def versions_are_kept(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "k", '{"n": 1}', version=3)
    stored = await _read(storage, "k")
    assert isinstance(stored, StoredSession)
    assert stored.version == 3, "the version is stored with the data"


async def rollback_discards_writes(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "k", '{"n": 1}')
    await _write(storage, "gone", '{"n": 1}')
    try:
        async with storage.transaction() as tx:
            await tx.read("k")
            await tx.write("k", StoredSession('{"n": 99}'))
            await tx.read("gone")
            await tx.delete("gone")
            await tx.write("new", StoredSession('{"n": 1}'))
            await tx.enqueue(1, 1, [OutgoingCall("sendMessage", {"chat_id": 1, "text": "x"})], 0)
            raise _Boom
    except _Boom:
        pass
    assert await _data(storage, "k") == '{"n":1}', "a rolled-back write is discarded"
    assert await _data(storage, "gone") == '{"n":1}', "a rolled-back delete is discarded"
    assert await _read(storage, "new") is None, "a rolled-back insert is discarded"
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
    assert await _data(storage, "hot") == '{"n":50}', "concurrent read-increment-writes lose no increment"


async def a_read_waits_for_the_holder_to_commit(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "k", '{"by": "setup"}')
    async with _holding(storage, lambda tx: tx.read("k")) as holder, storage.transaction() as tx:
        reading = asyncio.ensure_future(tx.read("k"))
        await _still_blocked(reading, "a read waits while another transaction holds the key")
        await holder.finish(lambda tx: tx.write("k", StoredSession('{"by": "holder"}')))
        stored = await asyncio.wait_for(reading, WAIT_LIMIT)
        assert isinstance(stored, StoredSession)
        assert "holder" in stored.data, "after the holder commits, the waiting read sees its write"


async def a_read_of_a_missing_key_waits_too(make: StorageFactory) -> None:
    """The first two updates of a new chat must take turns like any others, though there is no row."""
    storage = await make()
    async with _holding(storage, lambda tx: tx.read("new")) as holder, storage.transaction() as tx:
        assert holder.result is None
        reading = asyncio.ensure_future(tx.read("new"))
        await _still_blocked(reading, "a read of a missing key waits while another transaction holds it")
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
            raise _Boom
    except _Boom:
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
    async with _holding(storage, lambda tx: tx.claim_update(1, 7)) as first, storage.transaction() as tx:
        assert first.result is True
        second = asyncio.ensure_future(tx.claim_update(1, 7))
        await _still_blocked(second, "a second claim of an update waits for the first to end")
        await first.finish(commit=False)
        assert await asyncio.wait_for(second, WAIT_LIMIT), "the first attempt rolled back: the second wins"
    async with storage.transaction() as tx:
        assert not await tx.claim_update(1, 7), "the second attempt's claim was committed"


async def ttl_expires(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "brief", '{"n": 1}', ttl=0.3)
    await _write(storage, "lasting", '{"n": 1}')
    await _write(storage, "renewed", '{"n": 1}', ttl=0.3)
    await _write(storage, "renewed", '{"n": 2}')
    assert await _read(storage, "brief") is not None, "a session is there until its ttl runs out"
    await asyncio.sleep(0.6)
    assert await _read(storage, "brief") is None, "an expired session reads as None"
    assert await _read(storage, "lasting") is not None, "a session written without ttl does not expire"
    assert await _data(storage, "renewed") == '{"n":2}', "a write without ttl clears an earlier expiry"


async def prune_removes_expired_sessions(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "brief", '{"n": 1}', ttl=0.2)
    await _write(storage, "lasting", '{"n": 1}')
    await asyncio.sleep(0.4)
    assert await storage.prune(keep_updates=3600, keep_sent=3600) == 1, "prune deletes the expired session"
    assert await storage.prune(keep_updates=3600, keep_sent=3600) == 0, "and it is gone"
    assert await _read(storage, "lasting") is not None, "prune keeps sessions that have not expired"


async def prune_forgets_old_update_ids_and_settled_calls(make: StorageFactory) -> None:
    storage = await make()
    calls = [OutgoingCall("sendMessage", {"chat_id": 1, "text": str(n)}) for n in range(2)]
    async with storage.transaction() as tx:
        await tx.claim_update(1, 1)
        sent, pending = await tx.enqueue(1, 1, calls, lease=0.3)
    await storage.mark_sent(sent.id)
    await asyncio.sleep(0.05)
    assert await storage.prune(keep_updates=0, keep_sent=0) == 2, "one update id and one sent call"
    async with storage.transaction() as tx:
        assert await tx.claim_update(1, 1), "a forgotten update id can be claimed again"
    await asyncio.sleep(0.4)
    due = await storage.claim_due(10, 30)
    assert [p.id for p in due] == [pending.id], "prune keeps calls that are not sent yet"


async def outbox_leases_and_confirmations(make: StorageFactory) -> None:
    storage = await make()
    calls = [OutgoingCall("sendMessage", {"chat_id": 1, "text": str(n)}) for n in range(3)]
    async with storage.transaction() as tx:
        pending = await tx.enqueue(5, 9, calls, lease=0.3)
    assert [p.params["text"] for p in pending] == ["0", "1", "2"], "enqueue returns the calls in order"
    assert await storage.claim_due(10, 30) == [], "a call leased to its sender is not due"
    async with storage.transaction() as tx:
        assert await tx.claim_unsent(5, 9, 30) == [], "a redelivery does not take over a live lease"
    await storage.mark_sent(pending[0].id)
    await storage.mark_failed(pending[1].id, "chat not found", retry_in=None)
    await asyncio.sleep(0.5)
    async with storage.transaction() as tx:
        retaken = await tx.claim_unsent(5, 9, 30)
    assert [p.params["text"] for p in retaken] == ["2"], "only calls nobody confirmed or gave up on"
    await storage.mark_failed(retaken[0].id, "flood", retry_in=0.2)
    assert await storage.claim_due(10, 30) == [], "a call to retry is not due before retry_in"
    await asyncio.sleep(0.4)
    due = await storage.claim_due(10, 30)
    assert [p.params["text"] for p in due] == ["2"], "a call to retry is due after retry_in"
    assert await storage.claim_due(10, 30) == [], "claim_due leases what it returns"


async def a_call_s_files_wait_with_it_until_it_is_sent(make: StorageFactory) -> None:
    storage = await make()
    photo = Upload("file0", "cat.png", bytes(range(256)) * 4)
    calls = [
        OutgoingCall("sendPhoto", {"chat_id": 1, "photo": "attach://file0"}, (photo,)),
        OutgoingCall("sendMessage", {"chat_id": 2, "text": "no file"}),
    ]
    async with storage.transaction() as tx:
        pending = await tx.enqueue(5, 10, calls, lease=0.2)
    assert [p.has_files for p in pending] == [True, False], "enqueue says which calls carry files"
    await asyncio.sleep(0.3)
    due = {p.method: p for p in await storage.claim_due(10, 30)}
    assert due["sendPhoto"].has_files and not due["sendMessage"].has_files, "so does a claim"
    assert await storage.call_files(due["sendPhoto"].id) == (photo,), "the bytes come back as queued"
    assert await storage.call_files(due["sendMessage"].id) == ()
    await storage.mark_sent(due["sendPhoto"].id)
    assert await storage.call_files(due["sendPhoto"].id) == (), "a sent call's files are dropped"
    async with storage.transaction() as tx:
        given_up = (await tx.enqueue(5, 11, calls[:1], lease=30))[0]
    await storage.mark_failed(given_up.id, "Bad Request", retry_in=None)
    assert await storage.call_files(given_up.id) == (), "so are a given-up call's"


async def a_move_leaves_a_forward_until_it_expires(make: StorageFactory) -> None:
    storage = await make()
    await _write(storage, "old", '{"n": 1}')
    async with storage.transaction() as tx:
        await tx.read("old")
        await tx.move("old", "new", 0.3)
    assert await _read(storage, "old") == Moved("new"), "a moved key reads as a forward to the new key"
    await asyncio.sleep(0.4)
    assert await _read(storage, "old") is None, "a forward reads as missing once `keep` has passed"
    assert await storage.prune(3600, 3600) == 1, "prune removes an expired forward"
    async with storage.transaction() as tx:
        await tx.read("again")
        await tx.move("again", "new", 60)
    await _write(storage, "again", '{"n": 2}')
    assert await _data(storage, "again") == '{"n":2}', "a write replaces a forward"


async def sends_keep_chat_order_and_share_budgets(make: StorageFactory) -> None:
    storage = await make()
    calls = [OutgoingCall("sendMessage", {"chat_id": chat, "text": "x"}) for chat in (5, 5, 6)]
    async with storage.transaction() as tx:
        _, second, _ = await tx.enqueue(1, 1, calls, lease=0)
    now = time.time() + 1
    due = await storage.claim_due(10, 30, now)
    assert [p.params["chat_id"] for p in due] == [5, 6], "only each chat's first unsent call is due"
    first, other = due
    behind = await storage.reserve_send(second, [Budget("*", 1.0)], now, 30)
    assert behind.verdict == "behind", "a chat's calls go in order"
    bot = Budget("*", 1.0)
    taken = await storage.reserve_send(first, [bot, Budget("5", 10.0)], now, 30)
    assert taken.verdict == "go", "a free budget gives a slot at once"
    spent = await storage.reserve_send(other, [bot, Budget("6", 10.0)], now, 30)
    assert spent.verdict == "wait" and spent.blocked_by == "*", "the bot's budget is shared by every chat"
    assert abs(spent.wait - 1.0) < 0.01, "and says when its next slot is"
    again = await storage.reserve_send(other, [bot, Budget("6", 10.0)], now + 1, 30)
    assert again.verdict == "go", "a refused reservation took no slot in the chat's budget"
    await storage.mark_sent(first.id)
    chat = await storage.reserve_send(second, [Budget("*", 0.001), Budget("5", 10.0)], now + 2, 30)
    assert chat.verdict == "wait" and chat.blocked_by == "5" and abs(chat.wait - 8.0) < 0.01, (
        "a chat's budget"
    )
    # Two sends in the last second or so (the meter reads 1.37 at now + 1): "near the budget" at rate 1.
    rule = FloodRule(chats=2, within=10.0, rate=1.0, pause_max=4.0)
    assert not await storage.pause_sends("6", now + 3600, now + 1, rule), "a 429 pauses its chat only"
    quiet = FloodRule(chats=2, within=10.0, rate=100.0, pause_max=4.0)
    assert not await storage.pause_sends("7", now + 3600, now + 1, quiet), "two chats, the bot sending little"
    assert await storage.pause_sends("8", now + 3600, now + 1, rule), "429s in chats at once, near the budget"
    status = await storage.outbox_status(now + 2)
    assert abs(status.paused_for - 3.0) < 0.01, "the whole bot pauses for pause_max, not retry_after"
    assert status.unsent == 2 and status.paused_chats == 3, "each chat for its retry_after"
    paused = await storage.reserve_send(second, [Budget("*", 0.001), Budget("5", 0.001)], now + 20, 30)
    assert paused.verdict == "go", "pauses end"


async def a_lease_covers_the_call_from_when_it_is_sent(make: StorageFactory) -> None:
    storage = await make()
    calls = [OutgoingCall("sendMessage", {"chat_id": 5, "text": "x"})]
    async with storage.transaction() as tx:
        [queued] = await tx.enqueue(1, 1, calls, lease=0)
    now = time.time() + 1
    [taken] = await storage.claim_due(10, 30, now)
    free = [Budget("*", 0.001)]
    lost = await storage.reserve_send(queued, free, now, 30)
    assert lost.verdict == "lost", "a sender whose lease was taken over is told so before it sends"
    assert (await storage.reserve_send(taken, free, now + 20, 30)).verdict == "go", "the holder may send"
    assert await storage.claim_due(10, 30, now + 40) == [], "the reservation renewed the lease from then"
    [retaken] = await storage.claim_due(10, 30, now + 51)
    assert (await storage.reserve_send(taken, free, now + 51, 30)).verdict == "lost", "once it ran out"
    await storage.mark_sent(retaken.id)
    assert (await storage.reserve_send(retaken, free, now + 52, 30)).verdict == "lost", "a sent call"


async def a_moved_chat_takes_its_unsent_calls_in_order(make: StorageFactory) -> None:
    storage = await make()
    calls = [
        OutgoingCall("sendMessage", {"chat_id": chat, "text": str(n)}) for n, chat in enumerate((5, 9, 5))
    ]
    async with storage.transaction() as tx:
        await tx.enqueue(1, 1, calls, lease=0)
    assert await storage.move_chat("5", 9) == 2, "every unsent call to the chat moves"
    due = await storage.claim_due(10, 30)
    assert [(p.params["chat_id"], p.params["text"]) for p in due] == [(9, "0")], "one chat now, in order"


def _letter(update_id: int, attempts: int = 1) -> DeadLetter:
    # What a dead letter may hold: JSON whose text jsonb would refuse, emoji, a multi-line traceback.
    body = f'{{"update_id": {update_id}, "message": {{"text": "\\u0000 \U0001f355"}}}}'
    return DeadLetter(
        update_id, body, "ValueError: x", "Traceback:\n  line 1\nValueError: x", "-1", "message", attempts
    )


async def _record(storage: Storage, bot_id: int, letter: DeadLetter) -> None:
    async with storage.transaction() as tx:
        assert await tx.claim_update(bot_id, letter.update_id)
        await tx.dead_letter(bot_id, letter)


async def dead_letters_are_kept_until_taken(make: StorageFactory) -> None:
    storage = await make()
    try:
        async with storage.transaction() as tx:
            await tx.claim_update(1, 5)
            await tx.dead_letter(1, _letter(5))
            raise _Boom
    except _Boom:
        pass
    assert await storage.dead_letters(1) == [], "a rolled-back dead letter is not recorded"
    await _record(storage, 1, _letter(5, attempts=2))
    await _record(storage, 1, _letter(3))
    listed = await storage.dead_letters(1)
    assert [d.update_id for d in listed] == [5, 3], "dead letters are listed oldest failure first"
    assert dataclasses.replace(listed[0], failed_at=0.0) == _letter(5, attempts=2), "kept as recorded"
    assert abs(listed[0].failed_at - time.time()) < 60, "with the time of the failure"
    assert await storage.dead_letters(2) == [], "another bot's dead letters are its own"
    try:
        async with storage.transaction() as tx:
            assert await tx.take_dead_letter(1, 5) == listed[0], "a take returns the letter"
            raise _Boom
    except _Boom:
        pass
    assert len(await storage.dead_letters(1)) == 2, "a rolled-back take leaves the dead letter"
    async with storage.transaction() as tx:
        assert await tx.take_dead_letter(1, 5) is not None
        assert await tx.take_dead_letter(1, 4) is None, "there is nothing to take for another update"
    assert [d.update_id for d in await storage.dead_letters(1)] == [3], "a committed take removes it"
    async with storage.transaction() as tx:
        assert await tx.take_dead_letter(1, 5) is None, "a taken dead letter cannot be taken again"
        assert not await tx.claim_update(1, 5), "its update stays claimed: a redelivery is a duplicate"
    async with storage.transaction() as tx:
        await tx.dead_letter(1, _letter(3, attempts=7))  # an update id seen again, long after
    assert [d.attempts for d in await storage.dead_letters(1)] == [7], "a later letter replaces an earlier"


async def a_take_waits_for_another_take_of_the_same_letter(make: StorageFactory) -> None:
    """Two replays of one dead letter at once: the second waits for the first; it finds the letter gone
    if the first committed, and takes it if the first rolled back."""
    storage = await make()
    for update_id in (1, 2):
        await _record(storage, 1, _letter(update_id))
    for update_id, commit in ((1, True), (2, False)):
        take = partial(_take, update_id=update_id)
        async with _holding(storage, take) as first, storage.transaction() as tx:
            assert first.result is not None
            second = asyncio.ensure_future(tx.take_dead_letter(1, update_id))
            await _still_blocked(second, "a second take of a dead letter waits for the first to end")
            await first.finish(commit=commit)
            taken = await asyncio.wait_for(second, WAIT_LIMIT)
            assert (taken is None) == commit, "after a committed take nothing is left; after a rollback, all"


async def _take(tx: Transaction, update_id: int) -> DeadLetter | None:
    return await tx.take_dead_letter(1, update_id)


CHECKS: list[Check] = [
    read_missing_is_none,
    write_then_read,
    overwrite_replaces,
    delete_removes,
    versions_are_kept,
    rollback_discards_writes,
    concurrent_writers_on_one_key_serialize,
    a_read_waits_for_the_holder_to_commit,
    a_read_of_a_missing_key_waits_too,
    claim_update_once,
    a_rolled_back_claim_can_be_claimed_again,
    concurrent_claims_of_one_update_let_one_through,
    a_claim_waits_for_the_first_attempt,
    ttl_expires,
    prune_removes_expired_sessions,
    prune_forgets_old_update_ids_and_settled_calls,
    outbox_leases_and_confirmations,
    a_call_s_files_wait_with_it_until_it_is_sent,
    a_move_leaves_a_forward_until_it_expires,
    sends_keep_chat_order_and_share_budgets,
    a_lease_covers_the_call_from_when_it_is_sent,
    a_moved_chat_takes_its_unsent_calls_in_order,
    dead_letters_are_kept_until_taken,
    a_take_waits_for_another_take_of_the_same_letter,
    *TIMER_CHECKS,
]


async def run_checks(make: StorageFactory, *, seconds_per_check: float = 30.0) -> dict[str, BaseException]:
    """Run every check in turn; return the ones that failed, by name, with what they raised."""
    failures: dict[str, BaseException] = {}
    for check in CHECKS:
        try:
            await asyncio.wait_for(check(make), seconds_per_check)
        except Exception as exc:  # TimeoutError included: a storage that deadlocks fails its check
            failures[check.__name__] = exc
    return failures
