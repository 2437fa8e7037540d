"""A small bakery that sells for Telegram Stars: the third bot on the framework, for inline mode, files
and payments.

    python -m bot serve --app examples.shop:build_bot       # webhook (local trial without BOT_TOKEN)
    python -m bot poll --app examples.shop:build_bot        # long polling, with BOT_TOKEN and DATABASE_URL

/start shows the shelf: each pastry's picture (a PNG made here, uploaded from bytes through the outbox)
with a "Buy" button, which sends an invoice in Telegram Stars (currency XTR: no payment provider and no
provider token). In any chat, `@yourbot cro` lists the pastries that match as inline results, each an
invoice too. Telegram then asks the bot to confirm the order (pre_checkout_query: answered within its
10 seconds, refusing a pastry sold out or a price that changed), and reports the payment as a message
with `successful_payment`: that is where the pastry is handed over and the stock goes down, exactly once
however often Telegram delivers the update, because the update's claim, the stock and the customer's
receipt commit in one transaction. /orders lists what you bought; /refund <charge id> refunds a Stars
payment (refundStarPayment) and puts the pastry back.

Turn on payments in @BotFather (Bot Settings → Payments is not needed for Stars) and inline mode
(/setinline) before trying it with a real token.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from bot import Bot, Context, Filter, button, data_startswith, inline_keyboard, session, user_key
from bot.types import (
    InlineQueryResultArticle,
    InputFile,
    InputInvoiceMessageContent,
    LabeledPrice,
    SuccessfulPayment,
)

__all__ = ["PASTRIES", "Customer", "Pastry", "Shelf", "build_bot", "picture"]

STARS = "XTR"


@dataclass(frozen=True)
class Pastry:
    id: str
    name: str
    price: int  # in Stars
    colour: tuple[int, int, int]


PASTRIES = {
    p.id: p
    for p in (
        Pastry("croissant", "Croissant", 5, (226, 170, 80)),
        Pastry("cinnamon", "Cinnamon roll", 7, (160, 100, 50)),
        Pastry("eclair", "Éclair", 9, (90, 60, 40)),
    )
}


@dataclass
class Shelf:
    """What is left to sell: one row for the whole shop (the key "shelf")."""

    stock: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PASTRIES, 3))
    sold: int = 0


@dataclass
class Customer:
    """One per person (keyed by user id): what they bought, by Telegram's charge id."""

    receipts: dict[str, str] = field(default_factory=dict)  # telegram_payment_charge_id -> pastry id
    stars: int = 0


def picture(pastry: Pastry, size: int = 48) -> bytes:
    """A PNG of one colour: a stand-in for a photo, made without a file or a library."""
    row = b"\x00" + bytes(pastry.colour) * size

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * size))
        + chunk(b"IEND", b"")
    )


def payload(pastry: Pastry) -> str:
    """What an invoice carries back in its pre-checkout query and payment: the pastry and its price."""
    return f"{pastry.id}:{pastry.price}"


def pastry_of(invoice_payload: str) -> Pastry | None:
    """The pastry an invoice is for, if it is still sold at that price."""
    pastry_id, _, price = invoice_payload.partition(":")
    pastry = PASTRIES.get(pastry_id)
    return pastry if pastry is not None and str(pastry.price) == price else None


def invoice(pastry: Pastry) -> InputInvoiceMessageContent:
    return InputInvoiceMessageContent(
        title=pastry.name,
        description=f"One {pastry.name.lower()}, fresh today.",
        payload=payload(pastry),
        currency=STARS,
        prices=[LabeledPrice(label=pastry.name, amount=pastry.price)],
    )


def paid(ctx: Context[Customer]) -> bool:
    message = ctx.message
    return message is not None and message.successful_payment is not None


def build_bot() -> Bot[Customer]:
    bot = Bot(
        session(initial=Customer, get_session_key=user_key, prefix="shop-customer:"),
        # One row for the whole shop, locked only by the handlers that ask for it (lazy): an inline
        # query or /orders does not wait for a purchase.
        sessions={
            "shelf": session(initial=Shelf, get_session_key=lambda update: "shelf", prefix="shop:", lazy=True)
        },
        name="shop-bot",
    )
    bot.examples = ["/start", "/orders"]

    @bot.command("start")
    async def start(ctx: Context[Customer]) -> None:
        assert ctx.chat is not None
        shelf: Shelf = await ctx.get_session("shelf")
        for pastry in PASTRIES.values():
            left = shelf.stock[pastry.id]
            ctx.outbox.send_photo(
                chat_id=ctx.chat.id,
                photo=InputFile(picture(pastry), filename=f"{pastry.id}.png"),
                caption=f"<b>{pastry.name}</b>: {pastry.price} ⭐, {left} left",
                parse_mode="HTML",
                reply_markup=inline_keyboard([button(f"Buy for {pastry.price} ⭐", f"buy:{pastry.id}")]),
            )

    @bot.callback_query(data_startswith("buy:"))
    async def buy(ctx: Context[Customer]) -> None:
        assert ctx.data is not None and ctx.chat is not None
        pastry = PASTRIES.get(ctx.data.removeprefix("buy:"))
        if pastry is None:
            ctx.answer("We don't bake that.", show_alert=True)
            return
        ctx.answer()
        content = invoice(pastry)
        ctx.outbox.send_invoice(
            chat_id=ctx.chat.id,
            title=content.title,
            description=content.description,
            payload=content.payload,
            currency=content.currency,
            prices=content.prices,
        )

    @bot.inline_query()
    async def search(ctx: Context[Customer]) -> None:
        query = ctx.inline_query
        assert query is not None
        words = query.query.strip().lower()
        found = [p for p in PASTRIES.values() if words in p.name.lower() or words in p.id]
        ctx.outbox.answer_inline_query(
            inline_query_id=query.id,
            results=[
                InlineQueryResultArticle(
                    id=pastry.id,
                    title=f"{pastry.name}: {pastry.price} ⭐",
                    description="Send an invoice for it",
                    input_message_content=invoice(pastry),
                )
                for pastry in found
            ],
            cache_time=0,  # the stock changes: no cached answers
            is_personal=True,
        )

    @bot.pre_checkout_query()
    async def confirm(ctx: Context[Customer]) -> None:
        query = ctx.pre_checkout_query
        assert query is not None
        pastry = pastry_of(query.invoice_payload)
        shelf: Shelf = await ctx.get_session("shelf")
        if pastry is None or query.currency != STARS or query.total_amount != pastry.price:
            ctx.outbox.answer_pre_checkout_query(
                pre_checkout_query_id=query.id, ok=False, error_message="That offer has changed; try /start."
            )
        elif shelf.stock[pastry.id] <= 0:
            ctx.outbox.answer_pre_checkout_query(
                pre_checkout_query_id=query.id,
                ok=False,
                error_message=f"Sorry, the {pastry.name.lower()}s are gone.",
            )
        else:
            ctx.outbox.answer_pre_checkout_query(pre_checkout_query_id=query.id, ok=True)

    @bot.message(Filter(paid))
    async def hand_over(ctx: Context[Customer]) -> None:
        assert ctx.message is not None and ctx.chat is not None
        payment: SuccessfulPayment | None = ctx.message.successful_payment
        assert payment is not None
        customer, shelf = ctx.session, await ctx.get_session("shelf")
        if payment.telegram_payment_charge_id in customer.receipts:
            return  # the same charge in another update: Telegram does not do that, but a receipt says it all
        pastry = pastry_of(payment.invoice_payload)
        pastry_id = pastry.id if pastry is not None else payment.invoice_payload.partition(":")[0]
        customer.receipts[payment.telegram_payment_charge_id] = pastry_id
        customer.stars += payment.total_amount
        if pastry_id in shelf.stock:
            # Confirmed at pre-checkout; another buyer may have paid for the last one meanwhile, and a
            # paid order is never refused: the shelf goes below zero and the baker bakes one more.
            shelf.stock[pastry_id] -= 1
        shelf.sold += 1
        name = pastry.name if pastry is not None else pastry_id
        ctx.reply(
            f"Thank you! Your <b>{name}</b> is on its way. Receipt: <code>{payment.telegram_payment_charge_id}</code>",
            parse_mode="HTML",
        )

    @bot.command("orders")
    async def orders(ctx: Context[Customer]) -> None:
        bought = [PASTRIES[p].name if p in PASTRIES else p for p in ctx.session.receipts.values()]
        ctx.reply(
            f"You bought: {', '.join(bought)} ({ctx.session.stars} ⭐)."
            if bought
            else "No orders yet: /start"
        )

    @bot.command("refund")
    async def refund(ctx: Context[Customer]) -> None:
        assert ctx.command is not None and ctx.from_user is not None
        charge = ctx.command.args.strip()
        pastry_id = ctx.session.receipts.pop(charge, None)
        if pastry_id is None:
            ctx.reply("No such receipt. /orders lists yours.")
            return
        shelf: Shelf = await ctx.get_session("shelf")
        if pastry_id in shelf.stock:
            shelf.stock[pastry_id] += 1
        ctx.outbox.refund_star_payment(user_id=ctx.from_user.id, telegram_payment_charge_id=charge)
        ctx.reply("Refunded: the Stars go back to you.")

    return bot
