"""The conformance suite's checks of the outbox (part of `bot.testing.conformance.CHECKS`): calls queued
in an update's transaction, leased to one sender at a time, sent in each chat's order within shared
budgets, paused by 429s, moved with a migrated chat, and forgotten by prune once settled."""

from __future__ import annotations

import asyncio
import time

from ..files import Upload
from ..storage import Budget, FloodRule, OutgoingCall
from .conformance_tools import StorageFactory

__all__ = [
    "a_call_s_files_wait_with_it_until_it_is_sent",
    "a_lease_covers_the_call_from_when_it_is_sent",
    "a_moved_chat_takes_its_unsent_calls_in_order",
    "outbox_leases_and_confirmations",
    "prune_forgets_old_update_ids_and_settled_calls",
    "sends_keep_chat_order_and_share_budgets",
]


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
