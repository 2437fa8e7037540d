"""Routers, middleware and fall-through, driven through the pipeline as an update would be."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest

from bot.context import BotIdentity, Context
from bot.dispatch import Bot, Router, SkipHandler
from bot.filters import Filter, text
from bot.metrics import Metrics
from bot.pipeline import Outcome, Pipeline, Status
from bot.session import session
from bot.storage import Storage
from bot.storage.memory import MemoryStorage
from bot.telegram import decode_update
from bot.testing.updates import callback_update, encode, message_update, text_update

pytestmark = pytest.mark.anyio

ME = BotIdentity(42, "todo_bot")
Next = Callable[[], Awaitable[None]]


@dataclass
class Seen:
    count: int = 0


class NoDatabase:
    """A storage any use of which fails the test: proves that routing did not touch the database."""

    def transaction(self) -> NoReturn:
        raise AssertionError("the database was used")


async def process(bot: Bot[Any], raw: dict[str, Any], storage: Any = None) -> Outcome:
    run = Pipeline(bot, storage if storage is not None else MemoryStorage(), ME, Metrics())
    return await run.process(decode_update(encode(raw)))


def texts(outcome: Outcome) -> list[str]:
    return [c.params["text"] for c in outcome.to_send]


async def test_an_included_routers_handlers_run_after_the_ones_registered_before_it() -> None:
    bot: Bot[None] = Bot()
    admin: Router[None] = Router("admin")

    @bot.message(text(equals="hi"))
    async def hi(ctx: Context[None]) -> None:
        ctx.reply("bot")

    @admin.message()
    async def anything(ctx: Context[None]) -> None:
        ctx.reply("admin")

    bot.include_router(admin)
    assert texts(await process(bot, message_update(1, -1, "hi"))) == ["bot"]
    assert texts(await process(bot, message_update(2, -1, "other"))) == ["admin"]


async def test_a_routers_middleware_wraps_only_its_own_handlers_and_sees_the_session(
    storage: Storage,
) -> None:
    bot = Bot(session(initial=Seen))
    admin: Router[Seen] = Router("admin")
    order: list[str] = []

    @bot.use
    async def outer(ctx: Context[Seen], next: Next) -> None:
        order.append(f"bot in, session {ctx.session.count}")
        ctx.session.count += 1
        await next()
        order.append("bot out")

    @admin.use
    async def inner(ctx: Context[Seen], next: Next) -> None:
        order.append("admin in")
        await next()

    @bot.command("plain")
    async def plain(ctx: Context[Seen]) -> None:
        order.append("plain")

    @admin.command("ban")
    async def ban(ctx: Context[Seen]) -> None:
        order.append(f"ban, session {ctx.session.count}")

    bot.include_router(admin)
    run = Pipeline(bot, storage, ME, Metrics())
    await run.process(text_update(1, -1, "/plain"))
    assert order == ["bot in, session 0", "plain", "bot out"]
    order.clear()
    await run.process(text_update(2, -1, "/ban"))
    assert order == ["bot in, session 1", "admin in", "ban, session 2", "bot out"]


async def test_a_middleware_that_does_not_call_next_stops_the_update_and_its_changes_commit(
    storage: Storage,
) -> None:
    bot = Bot(session(initial=Seen))

    @bot.use
    async def gate(ctx: Context[Seen], next: Next) -> None:
        ctx.session.count += 1
        if ctx.message is not None and ctx.message.text == "stop":
            ctx.reply("stopped")
            return
        await next()

    @bot.message()
    async def report(ctx: Context[Seen]) -> None:
        ctx.reply(str(ctx.session.count))

    run = Pipeline(bot, storage, ME, Metrics())
    assert texts(await run.process(text_update(1, -1, "stop"))) == ["stopped"]
    assert texts(await run.process(text_update(2, -1, "go"))) == ["2"]


async def test_a_routers_middleware_that_does_not_call_next_ends_the_update_no_sibling_runs(
    storage: Storage,
) -> None:
    """Before, the router answered "nothing handled" and its parent went on to the next sibling."""
    bot = Bot(session(initial=Seen))
    gated: Router[Seen] = Router("gated")

    @gated.use
    async def gate(ctx: Context[Seen], next: Next) -> None:
        ctx.session.count += 1
        ctx.reply(f"gated {ctx.session.count}")

    @gated.message()
    async def inside(ctx: Context[Seen]) -> None:
        ctx.reply("inside")

    bot.include_router(gated)

    @bot.message()
    async def sibling(ctx: Context[Seen]) -> None:
        ctx.reply("sibling")

    run = Pipeline(bot, storage, ME, Metrics())
    assert texts(await run.process(text_update(1, -1, "x"))) == ["gated 1"]
    assert texts(await run.process(text_update(2, -1, "x"))) == ["gated 2"]  # its change committed


async def test_a_routers_middleware_that_calls_next_still_falls_through_when_every_handler_skips() -> None:
    bot: Bot[None] = Bot()
    inner: Router[None] = Router("inner")
    order: list[str] = []

    @inner.use
    async def around(ctx: Context[None], next: Next) -> None:
        order.append("in")
        await next()
        order.append("out")

    @inner.message()
    async def skips(ctx: Context[None]) -> None:
        raise SkipHandler

    bot.include_router(inner)

    @bot.message()
    async def sibling(ctx: Context[None]) -> None:
        ctx.reply("sibling")

    assert texts(await process(bot, message_update(1, -1, "x"))) == ["sibling"]
    assert order == ["in", "out"]


async def test_skip_handler_falls_through_to_the_next_match_even_in_another_router() -> None:
    bot: Bot[None] = Bot()
    later: Router[None] = Router("later")
    calls: list[str] = []

    @bot.message()
    async def first(ctx: Context[None]) -> None:
        calls.append("first")
        raise SkipHandler

    @bot.message(text(equals="never"))
    async def not_matching(ctx: Context[None]) -> None:
        calls.append("not matching")

    @later.message()
    async def second(ctx: Context[None]) -> None:
        calls.append("second")
        ctx.reply("second")

    @later.message()
    async def third(ctx: Context[None]) -> None:
        calls.append("third")

    bot.include_router(later)
    assert texts(await process(bot, message_update(1, -1, "x"))) == ["second"]
    assert calls == ["first", "second"]


async def test_without_fall_through_the_first_match_wins() -> None:
    bot: Bot[None] = Bot()

    @bot.command("help")
    async def help_(ctx: Context[None]) -> None:
        ctx.reply("help")

    @bot.message()
    async def echo(ctx: Context[None]) -> None:
        ctx.reply("echo")

    assert texts(await process(bot, message_update(1, -1, "/help"))) == ["help"]


async def test_an_update_no_filter_wants_costs_no_database_work_even_with_async_filters() -> None:
    bot = Bot(session(initial=Seen))
    asked: list[int] = []

    async def never(ctx: Context[Seen]) -> bool:
        asked.append(ctx.update.update_id)
        return False

    @bot.message(never)
    async def handler(ctx: Context[Seen]) -> None:
        raise AssertionError("not wanted")

    @bot.callback_query()
    async def press(ctx: Context[Seen]) -> None:
        raise AssertionError("not a message")

    outcome = await process(bot, message_update(1, -1, "x"), NoDatabase())
    assert outcome.status is Status.IGNORED
    assert asked == [1]


async def test_filters_are_checked_only_for_handlers_of_the_updates_kind() -> None:
    bot: Bot[None] = Bot()
    checked: list[str] = []

    @bot.message(lambda ctx: checked.append("message") is None)
    async def message(ctx: Context[None]) -> None:
        ctx.reply("message")

    @bot.callback_query(lambda ctx: checked.append("callback") is None)
    async def press(ctx: Context[None]) -> None:
        ctx.answer()

    await process(bot, callback_update(1, -1, 7, "x"))
    assert checked == ["callback"]


async def test_a_filter_reading_a_session_fails_saying_filters_run_before_the_database() -> None:
    bot = Bot(session(initial=Seen))

    @bot.message(Filter(lambda ctx: ctx.session.count > 0))
    async def handler(ctx: Context[Seen]) -> None:
        raise AssertionError("unreachable")

    storage = MemoryStorage()
    assert (await process(bot, message_update(1, -1, "x"), storage)).status is Status.DEAD_LETTER
    [letter] = await storage.dead_letters(ME.id)
    assert "filters run before the database is touched" in letter.error


def test_a_router_is_included_once_and_never_in_itself() -> None:
    bot: Bot[None] = Bot()
    child: Router[None] = Router("child")
    bot.include_router(child)
    with pytest.raises(ValueError, match="already included"):
        Bot[None]().include_router(child)
    with pytest.raises(ValueError, match="cycle"):
        child.include_router(bot)


def test_unknown_update_kinds_are_refused_at_registration() -> None:
    with pytest.raises(ValueError, match="unknown update kinds"):
        Router[None]().on("inline_querry")  # a typo: every real kind has its decorator now


def plain_handler(ctx: Context[None]) -> None: ...


async def two_argument_handler(ctx: Context[None], extra: int) -> None: ...


def plain_middleware(ctx: Context[None], next: Next) -> None: ...


async def one_argument_middleware(ctx: Context[None]) -> None: ...


HERE = r"\(.*test_router\.py:\d+\)"


@pytest.mark.parametrize(
    ("register", "error"),
    [
        (lambda r: r.message("hunger"), "filter 'hunger' \\(a str\\) is not callable"),
        (lambda r: r.message(text(), None), "filter None \\(a NoneType\\) is not callable"),
        (
            lambda r: r.message(lambda: True),
            "filter test_router\\..*<lambda> .* takes \\(\\), but is called with \\(ctx\\)",
        ),
        (lambda r: r.message()(plain_handler), f"handler test_router.plain_handler {HERE} is a plain def"),
        (lambda r: r.command("x")(two_argument_handler), "handler test_router.two_argument_handler .* takes"),
        (lambda r: r.use(plain_middleware), f"middleware test_router.plain_middleware {HERE} is a plain def"),
        (lambda r: r.use(one_argument_middleware), "called with \\(ctx, next\\)"),
    ],
)
def test_registration_refuses_what_cannot_run_naming_the_function(
    register: Callable[[Router[None]], Any], error: str
) -> None:
    """Before, each was accepted and failed on the first update that reached it."""
    with pytest.raises(TypeError, match=error):
        register(Router[None]())


class AsyncCallable:
    async def __call__(self, ctx: Context[None]) -> None:
        ctx.reply("object")


async def test_registration_accepts_sync_filters_async_callables_and_defaults() -> None:
    bot: Bot[None] = Bot()

    async def with_default(ctx: Context[None], extra: str = "default") -> None:
        ctx.reply(extra)

    bot.message(lambda ctx: ctx.message is not None and ctx.message.text == "a")(with_default)
    bot.message(text(equals="b"))(AsyncCallable())
    bot.message(text(equals="c"))(functools.partial(with_default, extra="partial"))
    assert texts(await process(bot, message_update(1, -1, "a"))) == ["default"]
    assert texts(await process(bot, message_update(2, -1, "b"))) == ["object"]
    assert texts(await process(bot, message_update(3, -1, "c"))) == ["partial"]


async def test_a_middleware_calling_next_twice_is_a_bug_not_a_double_apply() -> None:
    bot: Bot[None] = Bot()

    @bot.use
    async def twice(ctx: Context[None], next: Next) -> None:
        await next()
        await next()

    @bot.message()
    async def handler(ctx: Context[None]) -> None:
        ctx.reply("once")

    outcome = await process(bot, message_update(1, -1, "x"))
    assert outcome.status is Status.DEAD_LETTER
    assert outcome.to_send == []


async def test_edits_go_to_edited_message_handlers_and_new_messages_do_not() -> None:
    bot: Bot[None] = Bot()

    @bot.edited_message()
    async def edited(ctx: Context[None]) -> None:
        message = ctx.update.any_message
        assert ctx.message is None and message is not None
        ctx.reply(f"you edited: {message.text}")

    assert texts(await process(bot, message_update(1, -1, "new"))) == []
    assert texts(await process(bot, message_update(2, -1, "fixed", kind="edited_message"))) == [
        "you edited: fixed"
    ]
    channel_edit = message_update(3, -1, "post", kind="edited_channel_post")
    assert texts(await process(bot, channel_edit)) == ["you edited: post"]


class FromUser(Filter):
    """A filter written as aiogram's are: a subclass whose own `__call__` answers, with no function."""

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id

    async def __call__(self, ctx: Context[Any]) -> bool:
        return ctx.from_user is not None and ctx.from_user.id == self.user_id


class Refusing(Filter):
    """A subclass given a function that says yes, whose `__call__` says no: the override decides."""

    def __init__(self) -> None:
        super().__init__(lambda ctx: True)

    async def __call__(self, ctx: Context[Any]) -> bool:
        return False


async def test_a_filter_subclass_with_its_own_call_decides_for_its_handler() -> None:
    bot: Bot[None] = Bot()

    @bot.message(Refusing())
    async def refused(ctx: Context[None]) -> None:
        ctx.reply("refused")

    @bot.message(FromUser(7))
    async def seven(ctx: Context[None]) -> None:
        ctx.reply("seven")

    @bot.message()
    async def others(ctx: Context[None]) -> None:
        ctx.reply("others")

    assert texts(await process(bot, message_update(1, -1, "x", from_id=7))) == ["seven"]
    assert texts(await process(bot, message_update(2, -1, "x", from_id=8))) == ["others"]


async def test_filter_answers_that_are_not_bools_choose_handlers_as_their_truth_does() -> None:
    bot: Bot[None] = Bot()

    async def data(ctx: Context[None]) -> str | None:
        return None if ctx.message is None else ctx.message.text

    @bot.message(lambda ctx: ctx.message.caption)  # None: no
    async def captioned(ctx: Context[None]) -> None:
        ctx.reply("captioned")

    @bot.message(lambda ctx: ctx.message, data)  # a Message, then "x": yes
    async def texted(ctx: Context[None]) -> None:
        ctx.reply("texted")

    assert texts(await process(bot, message_update(1, -1, "x"))) == ["texted"]


async def test_each_routers_middleware_runs_once_around_the_handler_that_takes_the_update() -> None:
    bot: Bot[None] = Bot()
    child: Router[None] = Router("child")
    order: list[str] = []

    def around(name: str) -> Callable[[Context[None], Next], Awaitable[None]]:
        async def middleware(ctx: Context[None], next: Next) -> None:
            order.append(f"{name} in")
            await next()
            order.append(f"{name} out")

        return middleware

    bot.use(around("a"))
    bot.use(around("b"))
    child.use(around("c"))

    @bot.message()
    async def skips(ctx: Context[None]) -> None:
        order.append("bot skips")
        raise SkipHandler

    @child.message()
    async def skips_too(ctx: Context[None]) -> None:
        order.append("child skips")
        raise SkipHandler

    @child.message()
    async def takes(ctx: Context[None]) -> None:
        order.append("child takes")
        ctx.reply("taken")

    bot.include_router(child)
    assert texts(await process(bot, message_update(1, -1, "x"))) == ["taken"]
    assert order == [
        "a in", "b in", "bot skips", "c in", "child skips", "child takes", "c out", "b out", "a out"
    ]  # fmt: skip


async def test_an_inner_middleware_that_does_not_call_next_ends_the_update_and_the_outer_finishes() -> None:
    bot: Bot[None] = Bot()
    gated: Router[None] = Router("gated")
    order: list[str] = []

    @gated.use
    async def outer(ctx: Context[None], next: Next) -> None:
        order.append("outer in")
        await next()
        order.append("outer out")

    @gated.use
    async def gate(ctx: Context[None], next: Next) -> None:
        ctx.reply("gated")

    @gated.message()
    async def inside(ctx: Context[None]) -> None:
        ctx.reply("inside")

    bot.include_router(gated)

    @bot.message()
    async def sibling(ctx: Context[None]) -> None:
        ctx.reply("sibling")

    outcome = await process(bot, message_update(1, -1, "x"))
    assert (outcome.status, texts(outcome), order) == (Status.APPLIED, ["gated"], ["outer in", "outer out"])


@pytest.mark.parametrize("levels", [1, 2])
async def test_a_middleware_that_swallows_its_handlers_error_ends_the_update_no_sibling_runs(
    levels: int,
) -> None:
    """The handler did not skip: the update is done there, as the middleware left it (the inner of two
    middlewares swallowing, the outer sees its next return)."""
    bot: Bot[None] = Bot()
    careful: Router[None] = Router("careful")
    order: list[str] = []

    if levels == 2:

        @careful.use
        async def outer(ctx: Context[None], next: Next) -> None:
            await next()
            order.append("outer out")

    @careful.use
    async def swallow(ctx: Context[None], next: Next) -> None:
        try:
            await next()
        except ValueError:
            ctx.reply("swallowed")

    @careful.message()
    async def fails(ctx: Context[None]) -> None:
        raise ValueError("boom")

    bot.include_router(careful)

    @bot.message()
    async def sibling(ctx: Context[None]) -> None:
        ctx.reply("sibling")

    outcome = await process(bot, message_update(1, -1, "x"))
    assert (outcome.status, texts(outcome)) == (Status.APPLIED, ["swallowed"])
    assert order == ["outer out"] * (levels - 1)


async def test_an_inner_middleware_calling_next_twice_is_a_dead_letter_naming_it() -> None:
    bot: Bot[None] = Bot()

    @bot.use
    async def outer(ctx: Context[None], next: Next) -> None:
        await next()

    @bot.use
    async def twice(ctx: Context[None], next: Next) -> None:
        await next()
        await next()

    @bot.message()
    async def handler(ctx: Context[None]) -> None:
        ctx.reply("once")

    storage = MemoryStorage()
    outcome = await process(bot, message_update(1, -1, "x"), storage)
    assert (outcome.status, outcome.to_send) == (Status.DEAD_LETTER, [])
    [letter] = await storage.dead_letters(ME.id)
    assert "twice" in letter.error and "called next() twice" in letter.error
