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

This module is the suite's face: its checks, in the order they run, and the runner. The checks live
beside it by what they check: `conformance_sessions` (sessions and the update claim),
`conformance_outbox`, `conformance_dead_letters` and `conformance_timers`, on `conformance_tools`.
"""

from __future__ import annotations

import asyncio

from .conformance_dead_letters import (
    a_take_waits_for_another_take_of_the_same_letter,
    dead_letters_are_kept_until_taken,
)
from .conformance_outbox import (
    a_call_s_files_wait_with_it_until_it_is_sent,
    a_lease_covers_the_call_from_when_it_is_sent,
    a_moved_chat_takes_its_unsent_calls_in_order,
    outbox_leases_and_confirmations,
    prune_forgets_old_update_ids_and_settled_calls,
    sends_keep_chat_order_and_share_budgets,
)
from .conformance_sessions import (
    a_claim_waits_for_the_first_attempt,
    a_move_leaves_a_forward_until_it_expires,
    a_read_of_a_missing_key_waits_too,
    a_read_waits_for_the_holder_to_commit,
    a_rolled_back_claim_can_be_claimed_again,
    claim_update_once,
    concurrent_claims_of_one_update_let_one_through,
    concurrent_writers_on_one_key_serialize,
    delete_removes,
    overwrite_replaces,
    prune_removes_expired_sessions,
    read_missing_is_none,
    rollback_discards_writes,
    ttl_expires,
    versions_are_kept,
    write_then_read,
)
from .conformance_timers import TIMER_CHECKS
from .conformance_tools import Check, StorageFactory

__all__ = ["CHECKS", "Check", "StorageFactory", "run_checks"]

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


async def run_checks(
    make: StorageFactory, *, seconds_per_check: float = 30.0, at_once: bool = False
) -> dict[str, BaseException]:
    """Run every check in turn; return the ones that failed, by name, with what they raised.

    `at_once` runs them concurrently instead, for storages that share nothing between the ones `make`
    returns (in-memory ones): most checks spend their time waiting out leases and locks, so the suite
    then takes about as long as its slowest check instead of their sum."""
    failures: dict[str, BaseException] = {}

    async def run(check: Check) -> None:
        try:
            await asyncio.wait_for(check(make), seconds_per_check)
        except Exception as exc:  # TimeoutError included: a storage that deadlocks fails its check
            failures[check.__name__] = exc

    if at_once:
        await asyncio.gather(*(run(check) for check in CHECKS))
    else:
        for check in CHECKS:
            await run(check)
    return failures
