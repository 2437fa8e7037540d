"""The conformance suite's checks of dead letters (part of `bot.testing.conformance.CHECKS`): recorded in
the update's transaction as received, listed per bot, and taken once by a replay, which a second replay
of the same letter waits for."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from functools import partial

from ..storage import DeadLetter, Storage, Transaction
from .conformance_tools import WAIT_LIMIT, Boom, StorageFactory, holding, still_blocked

__all__ = ["a_take_waits_for_another_take_of_the_same_letter", "dead_letters_are_kept_until_taken"]


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
            raise Boom
    except Boom:
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
            raise Boom
    except Boom:
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
        async with holding(storage, take) as first, storage.transaction() as tx:
            assert first.result is not None
            second = asyncio.ensure_future(tx.take_dead_letter(1, update_id))
            await still_blocked(second, "a second take of a dead letter waits for the first to end")
            await first.finish(commit=commit)
            taken = await asyncio.wait_for(second, WAIT_LIMIT)
            assert (taken is None) == commit, "after a committed take nothing is left; after a rollback, all"


async def _take(tx: Transaction, update_id: int) -> DeadLetter | None:
    return await tx.take_dead_letter(1, update_id)
