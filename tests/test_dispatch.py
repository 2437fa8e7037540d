"""The bot object: what it asks Telegram for, what it refuses when built, and its error hook."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from bot.context import BotIdentity, Context
from bot.dispatch import Bot, Router
from bot.failures import TryLater
from bot.filters import text
from bot.metrics import Metrics
from bot.pipeline import Pipeline, Status
from bot.session import chat_key, chat_user_key, session, user_key
from bot.storage import Storage, StorageUnavailable
from bot.storage.memory import MemoryStorage
from bot.testing.updates import text_update

pytestmark = pytest.mark.anyio

ME = BotIdentity(42, "todo_bot")


@dataclass
class Counted:
    count: int = 0


def add(old: Counted, new: Counted) -> Counted:
    return Counted(old.count + new.count)


def test_allowed_updates_are_the_kinds_of_every_registered_handler_in_telegrams_order() -> None:
    bot: Bot[None] = Bot()
    inner: Router[None] = Router()
    assert bot.allowed_updates() == []

    @inner.message_reaction()
    @inner.callback_query()
    async def handler(ctx: Context[None]) -> None: ...

    bot.include_router(inner)
    bot.edited_message()(handler)
    assert bot.allowed_updates() == [
        "edited_message",
        "edited_channel_post",
        "message_reaction",
        "callback_query",
    ]


def test_a_session_that_follows_group_upgrades_asks_for_messages_even_without_a_message_handler() -> None:
    bot = Bot(session(initial=Counted, merge=add))
    assert bot.allowed_updates() == ["message"]


@pytest.mark.parametrize("key", [user_key, chat_user_key, lambda update: "global"])
def test_merge_with_a_custom_key_is_refused_when_the_bot_is_built(key: Any) -> None:
    with pytest.raises(ValueError, match="merge= works only with the default key"):
        Bot(session(initial=Counted, merge=add, get_session_key=key))
    with pytest.raises(ValueError, match="session 'user'"):
        Bot(sessions={"user": session(initial=Counted, merge=add, get_session_key=key)})


def by_topic(update: Any) -> str | None:
    return "topic:1"


def by_topic_too(update: Any) -> str | None:
    return "topic:2"


OTHER_STORAGE = MemoryStorage()


@pytest.mark.parametrize(
    ("first", "second", "reason"),
    [
        # The finding: a private chat's id is its user's id.
        ({}, {"get_session_key": user_key}, "in a private chat the chat id is the user id"),
        ({"prefix": "x:"}, {"get_session_key": user_key, "prefix": "x:"}, "in a private chat"),
        ({}, {}, "same storage, key function and prefix"),
        (
            {},
            {"get_session_key": by_topic},
            "'other' is keyed by test_dispatch.by_topic .*, which may return",
        ),
        (
            {"get_session_key": by_topic},
            {"get_session_key": by_topic_too},
            "'chat' is keyed by test_dispatch.by_topic",
        ),
        # A custom key under a shorter prefix could return "chat:..." itself.
        ({"prefix": "chat:"}, {"get_session_key": by_topic}, "prefix 'chat:' starts with prefix ''"),
        ({"prefix": "1"}, {}, "prefix '1' starts with prefix ''"),  # chat "1" + "5" is "15"
    ],
)
def test_two_sessions_whose_keys_could_meet_are_refused_when_the_bot_is_built(
    first: dict[str, Any], second: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ValueError, match=f"sessions 'chat' and 'other' would share their rows \\(.*{reason}"):
        Bot(sessions={"chat": session(Counted, **first), "other": session(Counted, **second)})


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({}, {"get_session_key": user_key, "prefix": "user:"}),
        ({"prefix": "chat:"}, {"get_session_key": user_key}),  # no user id starts with "chat:"
        ({}, {"get_session_key": chat_user_key}),  # "chat/user" holds a "/", a chat id never does
        ({"get_session_key": user_key}, {"get_session_key": chat_user_key}),
        ({}, {"get_session_key": by_topic, "prefix": "topic:"}),
        ({"get_session_key": by_topic, "prefix": "a:"}, {"get_session_key": by_topic_too, "prefix": "b:"}),
        ({}, {"get_session_key": user_key, "storage": OTHER_STORAGE}),
        ({}, {"storage": OTHER_STORAGE}),
        ({"get_session_key": chat_key}, {"get_session_key": user_key, "prefix": "u"}),
    ],
)
def test_sessions_whose_keys_never_meet_are_accepted(first: dict[str, Any], second: dict[str, Any]) -> None:
    Bot(sessions={"chat": session(Counted, **first), "other": session(Counted, **second)})


def plain_hook(error: Exception, ctx: Context[None]) -> None: ...


async def no_context(update: Any) -> str | None: ...


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: Bot().catch(plain_hook), "error hook test_dispatch.plain_hook .* is a plain def"),
        (lambda: Bot().catch(lambda error: None), "error hook .*<lambda> .* called with \\(error, ctx\\)"),
        (lambda: session(Counted, get_session_key=lambda: "k"), "key function .* called with \\(update\\)"),
        (lambda: session(Counted, get_session_key="chat"), "key function 'chat' \\(a str\\) is not callable"),
        (
            lambda: session(Counted, get_session_key=no_context),
            "key function test_dispatch.no_context .* is an async",
        ),
        (lambda: session(lambda count: Counted(count), data_type=Counted), "initial .* takes \\(count\\)"),
        (lambda: session(Counted, merge=lambda old: old), "merge .* called with \\(old, new\\)"),
    ],
)
def test_an_error_hook_or_session_function_that_cannot_run_is_refused_naming_it(
    build: Callable[[], Any], error: str
) -> None:
    with pytest.raises(TypeError, match=error):
        build()


def counting_bot() -> Bot[Counted]:
    bot = Bot(session(initial=Counted))

    @bot.message(text(equals="+"))
    async def plus(ctx: Context[Counted]) -> None:
        ctx.session.count += 1

    @bot.message(text(equals="boom"))
    async def boom(ctx: Context[Counted]) -> None:
        ctx.session.count += 100
        ctx.reply("never sent")
        raise ZeroDivisionError("a bug")

    return bot


async def test_the_error_hook_sees_the_state_before_the_handler_and_its_reply_is_sent_once(
    storage: Storage,
) -> None:
    bot = counting_bot()
    seen: list[tuple[str, int]] = []

    @bot.catch
    async def on_error(error: Exception, ctx: Context[Counted]) -> None:
        seen.append((type(error).__name__, ctx.session.count))
        ctx.session.count += 10  # the hook's own change is kept
        ctx.reply(f"sorry: {error}")

    run = Pipeline(bot, storage, ME, Metrics())
    await run.process(text_update(1, -1, "+"))
    failed = await run.process(text_update(2, -1, "boom"))
    assert failed.status is Status.FAILED
    assert [c.params["text"] for c in failed.to_send] == ["sorry: a bug"]
    assert seen == [("ZeroDivisionError", 1)]
    again = await run.process(text_update(2, -1, "boom"))  # Telegram redelivers it
    assert again.status is Status.DUPLICATE
    assert seen == [("ZeroDivisionError", 1)]
    assert run.metrics.count("bot_updates_total", kind="message", outcome="failed") == 1
    async with storage.transaction() as tx:
        stored = await tx.read("-1")
    assert stored is not None and '"count":11' in stored.data.replace(" ", "")


async def test_an_error_hook_that_raises_rolls_the_update_back_into_a_dead_letter(storage: Storage) -> None:
    bot = counting_bot()
    hooked: list[str] = []

    @bot.catch
    async def on_error(error: Exception, ctx: Context[Counted]) -> None:
        hooked.append(str(error))
        ctx.session.count += 10
        raise error

    run = Pipeline(bot, storage, ME, Metrics())
    await run.process(text_update(1, -1, "+"))
    outcome = await run.process(text_update(2, -1, "boom"))
    assert (outcome.status, outcome.to_send) == (Status.DEAD_LETTER, [])
    assert hooked == ["a bug"]  # the hook ran once, and not again when the update was recorded
    assert run.metrics.count("bot_updates_total", kind="message", outcome="dead_letter") == 1
    async with storage.transaction() as tx:
        stored = await tx.read("-1")
        assert not await tx.claim_update(ME.id, 2)  # claimed with its dead letter: not run again
    assert stored is not None and '"count":1' in stored.data.replace(" ", "")  # neither +100 nor +10
    [letter] = await storage.dead_letters(ME.id)
    assert (letter.update_id, letter.chat, letter.error) == (2, "-1", "ZeroDivisionError: a bug")


async def test_an_error_hook_sees_failures_outside_the_handlers_too_and_may_handle_them(
    storage: Storage,
) -> None:
    """A filter's bug reaches the hook as well (with no sessions: none were loaded); a hook that returns
    handled it, so its reply is sent and nothing is recorded."""
    bot: Bot[Counted] = Bot(session(initial=Counted))

    @bot.message(lambda ctx: 1 / 0)
    async def never(ctx: Context[Counted]) -> None:
        raise AssertionError("its filter fails")

    @bot.catch
    async def on_error(error: Exception, ctx: Context[Counted]) -> None:
        ctx.reply(f"sorry: {type(error).__name__}")

    run = Pipeline(bot, storage, ME, Metrics())
    outcome = await run.process(text_update(1, -1, "x"))
    assert outcome.status is Status.FAILED
    assert [c.params["text"] for c in outcome.to_send] == ["sorry: ZeroDivisionError"]
    assert await storage.dead_letters(ME.id) == []


async def test_database_errors_never_reach_the_error_hook() -> None:
    bot: Bot[None] = Bot()
    hooked: list[Exception] = []

    @bot.message()
    async def handler(ctx: Context[None]) -> None:
        raise StorageUnavailable("lock timeout")

    @bot.catch
    async def on_error(error: Exception, ctx: Context[None]) -> None:
        hooked.append(error)

    with pytest.raises(TryLater, match="lock timeout"):
        await Pipeline(bot, MemoryStorage(), ME, Metrics()).process(text_update(1, -1, "x"))
    assert hooked == []
