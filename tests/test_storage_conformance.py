"""Both storages pass the conformance suite that third-party adapters can run too, and the suite catches
storages that break the contract."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import pytest

from bot.storage import Storage
from bot.storage.memory import MemoryStorage, _MemoryTransaction
from bot.testing.conformance import CHECKS, Check, run_checks

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
async def test_storage_keeps_the_contract(storage: Storage, check: Check) -> None:
    async def make() -> Storage:
        return storage

    await check(make)


class _NoLocks:
    async def acquire(self, key: Hashable) -> None:
        return None

    def release(self, key: Hashable) -> None:
        return None


class LocklessStorage(MemoryStorage):
    """What grammY's storages are: reads and writes, and nothing keeping two updates apart."""

    def __init__(self) -> None:
        super().__init__()
        self._locks = _NoLocks()  # type: ignore[assignment]


class CommitsOnErrorStorage(MemoryStorage):
    """A storage that applies whatever a transaction did, even when it raised."""

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_MemoryTransaction]:
        tx = _MemoryTransaction(self)
        try:
            try:
                yield tx
            finally:
                tx.commit()
        finally:
            tx.release()


async def test_the_suite_fails_a_storage_without_locks_on_every_concurrency_promise() -> None:
    async def make() -> Storage:
        return LocklessStorage()

    assert set(await run_checks(make, seconds_per_check=10, at_once=True)) == {
        "concurrent_writers_on_one_key_serialize",
        "a_read_waits_for_the_holder_to_commit",
        "a_read_of_a_missing_key_waits_too",
        "concurrent_claims_of_one_update_let_one_through",
        "a_claim_waits_for_the_first_attempt",
        "a_take_waits_for_another_take_of_the_same_letter",
        "concurrent_fires_of_one_timer_let_one_through",
    }


async def test_the_suite_fails_a_storage_that_does_not_roll_back() -> None:
    async def make() -> Storage:
        return CommitsOnErrorStorage()

    assert set(await run_checks(make, seconds_per_check=10, at_once=True)) == {
        "rollback_discards_writes",
        "a_rolled_back_claim_can_be_claimed_again",
        "a_claim_waits_for_the_first_attempt",
        "dead_letters_are_kept_until_taken",
        "a_take_waits_for_another_take_of_the_same_letter",
        "a_rolled_back_schedule_or_fire_changes_nothing",
    }
