"""examples/shop.py through the webhook, against the fake Bot API, on both storages: an inline query is
answered, the shelf's pictures are uploaded as multipart from bytes through the outbox after the commit,
a pre-checkout query is confirmed or refused, and a successful payment delivered three times is applied
once."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from bot.storage import Storage
from bot.storage.postgres import PostgresStorage
from bot.testing.env import UNPACED_ENV
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.plugin import OpenWebhook
from bot.testing.updates import (
    callback_update,
    inline_query_update,
    pre_checkout_update,
    successful_payment_update,
    text_update,
)
from examples.shop import PASTRIES, build_bot, picture

pytestmark = pytest.mark.anyio

ANN = 501


async def test_an_inline_query_is_answered_with_an_invoice_per_matching_pastry(
    storage: Storage, webhook: OpenWebhook
) -> None:
    async with webhook(build_bot(), storage, **UNPACED_ENV) as hook:
        query = inline_query_update(1, ANN, "cro")
        await hook.send(query)
        await hook.send(query)  # delivered again: answered once
        [answer] = await hook.calls("answerInlineQuery")
        await asyncio.sleep(0.2)
        assert len(hook.fake.calls("answerInlineQuery")) == 1
    assert answer.params["inline_query_id"] == "q1" and answer.params["is_personal"] is True
    [result] = answer.params["results"]
    assert result["type"] == "article" and result["id"] == "croissant"
    assert result["input_message_content"] == {
        "title": "Croissant",
        "description": "One croissant, fresh today.",
        "payload": "croissant:5",
        "currency": "XTR",
        "prices": [{"label": "Croissant", "amount": 5}],
    }


async def test_the_shelf_s_pictures_are_uploaded_as_multipart_from_bytes_after_the_commit(
    storage: Storage, webhook: OpenWebhook, fake: FakeTelegram
) -> None:
    async with webhook(build_bot(), storage, **UNPACED_ENV) as hook:
        start = text_update(1, ANN, "/start", from_id=ANN)
        await hook.send(start)
        await hook.send(start)  # delivered again: not sent twice
        photos = await hook.calls("sendPhoto", len(PASTRIES))
        await asyncio.sleep(0.2)
    assert len(fake.calls("sendPhoto")) == len(PASTRIES)
    for call, pastry in zip(photos, PASTRIES.values(), strict=True):  # in the order queued: one chat
        assert call.params["photo"] == "attach://file0"
        assert call.files["file0"].filename == f"{pastry.id}.png"
        assert call.files["file0"].data == picture(pastry) and call.files["file0"].data.startswith(b"\x89PNG")
        assert call.params["caption"] == f"<b>{pastry.name}</b>: {pastry.price} ⭐, 3 left"
        assert json.loads(call.params["reply_markup"]) == {
            "inline_keyboard": [[{"text": f"Buy for {pastry.price} ⭐", "callback_data": f"buy:{pastry.id}"}]]
        }
    if isinstance(storage, PostgresStorage):
        # They went through the outbox table: committed with the update, marked sent, bytes dropped.
        rows = await storage.pool.fetch("SELECT method, sent_at, files FROM outbox ORDER BY id")
        assert [(r["method"], r["sent_at"] is not None, r["files"]) for r in rows] == [
            ("sendPhoto", True, None)
        ] * 3


async def test_a_press_sends_a_stars_invoice_and_pre_checkout_is_confirmed_or_refused(
    storage: Storage, webhook: OpenWebhook
) -> None:
    async with webhook(build_bot(), storage, **UNPACED_ENV) as hook:
        await hook.send(callback_update(1, ANN, ANN, "buy:eclair"))
        [invoice] = await hook.calls("sendInvoice")
        await hook.send(pre_checkout_update(2, ANN, "eclair:9", 9))
        await hook.send(pre_checkout_update(3, ANN, "eclair:1", 1))  # a price that is not ours
        answers = await hook.calls("answerPreCheckoutQuery", 2)
    assert invoice.params == {
        "chat_id": ANN,
        "title": "Éclair",
        "description": "One éclair, fresh today.",
        "payload": "eclair:9",
        "currency": "XTR",
        "prices": [{"label": "Éclair", "amount": 9}],
    }
    by_query = {a.params["pre_checkout_query_id"]: a.params for a in answers}
    assert by_query["pcq2"] == {"pre_checkout_query_id": "pcq2", "ok": True}
    assert by_query["pcq3"]["ok"] is False and "changed" in by_query["pcq3"]["error_message"]


async def test_a_successful_payment_delivered_three_times_is_applied_once(
    storage: Storage, webhook: OpenWebhook, fake: FakeTelegram
) -> None:
    async with webhook(build_bot(), storage, **UNPACED_ENV) as hook:
        paid = successful_payment_update(10, ANN, ANN, "croissant:5", 5)
        for _ in range(3):
            await hook.send(paid)
        await hook.send(text_update(11, ANN, "/orders", from_id=ANN))
        await hook.send(text_update(12, ANN, "/start", from_id=ANN))
        replies = await hook.replies(ANN, 2)
        photos = await hook.calls("sendPhoto", 3)
        await asyncio.sleep(0.2)
    assert replies == [
        "Thank you! Your <b>Croissant</b> is on its way. Receipt: <code>charge-10</code>",
        "You bought: Croissant (5 ⭐).",
    ]
    assert len(fake.sent_messages(ANN)) == 2  # no second thank-you
    assert photos[0].params["caption"].endswith("2 left")  # the stock went down once: 3 → 2
    if isinstance(storage, PostgresStorage):
        async with storage.pool.acquire() as conn:
            assert await stored(conn, "shop:shelf") == {
                "stock": {"croissant": 2, "cinnamon": 3, "eclair": 3},
                "sold": 1,
            }
            assert await stored(conn, f"shop-customer:{ANN}") == {
                "receipts": {"charge-10": "croissant"},
                "stars": 5,
            }


async def stored(conn: asyncpg.Connection, key: str) -> object:
    data = await conn.fetchval("SELECT data::text FROM sessions WHERE key = $1", key)
    return json.loads(data)


async def test_the_last_pastry_is_refused_at_pre_checkout_once_sold_out(
    memory_storage: Storage, webhook: OpenWebhook
) -> None:
    async with webhook(build_bot(), memory_storage, **UNPACED_ENV) as hook:
        for n in range(3):
            await hook.send(successful_payment_update(20 + n, ANN, ANN, "cinnamon:7", 7))
        await hook.send(pre_checkout_update(30, ANN, "cinnamon:7", 7))
        [answer] = await hook.calls("answerPreCheckoutQuery")
    assert answer.params["ok"] is False and "gone" in answer.params["error_message"]


async def test_a_refund_returns_the_stars_once_and_puts_the_pastry_back(
    memory_storage: Storage, webhook: OpenWebhook
) -> None:
    async with webhook(build_bot(), memory_storage, **UNPACED_ENV) as hook:
        await hook.send(successful_payment_update(40, ANN, ANN, "eclair:9", 9))
        refund = text_update(41, ANN, "/refund charge-40", from_id=ANN)
        await hook.send(refund)
        await hook.send(refund)  # delivered again: refunded once
        await hook.send(text_update(42, ANN, "/refund charge-40", from_id=ANN))  # asked again: no receipt
        await hook.send(text_update(43, ANN, "/start", from_id=ANN))
        [refunded] = await hook.calls("refundStarPayment")
        replies = await hook.replies(ANN, 3)
        photos = await hook.calls("sendPhoto", 3)
    assert refunded.params == {"user_id": ANN, "telegram_payment_charge_id": "charge-40"}
    assert replies[1:] == ["Refunded: the Stars go back to you.", "No such receipt. /orders lists yours."]
    assert photos[2].params["caption"].endswith("3 left")  # the éclair is back on the shelf
