"""The test kit users import: the pytest plugin and its fixtures, update builders that all return
`Update` with users of their own, and a fake Bot API that answers every method of the schema with a
result of its type. (That a bot in another folder can use it from the installed wheel:
tests/test_packaging.py.)"""

from __future__ import annotations

import time
import tomllib
import typing
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

import httpx
import msgspec
import pytest

from bot import methods
from bot.context import Context, ImmediateApi
from bot.dispatch import Bot
from bot.methods import METHODS, ApiMethods
from bot.session import session
from bot.storage import Storage
from bot.telegram import BotApi
from bot.testing import updates
from bot.testing.env import TOKEN
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.plugin import OpenWebhook
from bot.testing.processes import BotProcess
from bot.testing.results import RESULT_TYPES, minimal
from bot.types import InputFile, InputMediaPhoto, Update

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def test_the_plugin_is_registered_through_an_entry_point_and_loaded(request: pytest.FixtureRequest) -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    assert declared == {"telegram_webhook_sessions": "bot.testing.plugin"}
    plugin = request.config.pluginmanager.get_plugin("telegram_webhook_sessions")
    assert plugin is not None and plugin.__name__ == "bot.testing.plugin"


def test_tests_conftest_keeps_no_copy_of_the_plugin_s_fixtures() -> None:
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    for name in ("pg_cluster", "database_url", "fake", "telegram_root", "storage", "open_client", "webhook"):
        assert f"def {name}(" not in conftest, name


# --- update builders ------------------------------------------------------------------------------


def test_every_builder_returns_an_update_whose_raw_json_is_what_it_built() -> None:
    built = [
        updates.message_update(1, -5, "hi"),
        updates.text_update(2, -5, "hi"),
        updates.command_update(3, -5, "start", "test_bot"),
        updates.callback_update(4, -5, 7, "done:1"),
        updates.member_update(5, -5, 7, "left", "member"),
        updates.reaction_update(6, -5, 7, 3, "👍"),
        updates.inline_query_update(7, 7, "pizza"),
        updates.pre_checkout_update(8, 7, "order-1", 50),
        updates.successful_payment_update(9, 7, 7, "order-1", 50),
    ]
    assert all(isinstance(u, Update) for u in built)
    assert [u.kind for u in built] == [
        "message",
        "message",
        "message",
        "callback_query",
        "my_chat_member",
        "message_reaction",
        "inline_query",
        "pre_checkout_query",
        "message",
    ]
    for update in built:
        assert msgspec.json.decode(update.raw) == update.json()
        assert updates.encode(update) == update.raw  # what a test posts to the webhook
    payment = built[-1].message
    assert payment is not None and payment.successful_payment is not None
    assert payment.successful_payment.invoice_payload == "order-1"


def test_users_are_distinct_people_not_all_ann() -> None:
    people = [updates.message_update(n, -5, "hi", from_id=100 + n).from_user for n in range(6)]
    assert all(p is not None for p in people)
    names = {(p.first_name, p.last_name, p.username) for p in people if p is not None}
    assert len(names) == 6
    assert len({p.language_code for p in people if p is not None}) > 1
    assert updates.user(5) == updates.user(5)  # the same id, the same person: tests stay deterministic


# --- the fake answers every method ----------------------------------------------------------------

# Parameters the fake's own answers check, as Telegram would.
REQUIRED_BY_THE_FAKE: dict[str, dict[str, Any]] = {
    "setWebhook": {"url": "https://bot.test/webhook"},
    "getUpdates": {"timeout": 0},
    "editMessageText": {"chat_id": 1, "message_id": 1, "text": "x"},
    "sendMediaGroup": {"media": [InputMediaPhoto(media="AgACAgIAAxkBAAIB")]},
}


def required_params(method: str) -> dict[str, Any]:
    """The smallest valid value of each required parameter, from the method's typed parameters."""
    params_type = getattr(methods, f"{method[0].upper()}{method[1:]}Params", None)
    found: dict[str, Any] = {}
    if params_type is not None:
        for name, hint in get_type_hints(params_type, vars(methods), include_extras=True).items():
            if typing.get_origin(hint) is typing.Required:
                wanted = typing.get_args(hint)[0]
                found[name] = (
                    InputFile(b"x")
                    if wanted is InputFile
                    else minimal(wanted, prefer=lambda t: t is not InputFile)
                )
    return {**found, **REQUIRED_BY_THE_FAKE.get(method, {})}


@pytest.fixture
async def api(telegram_root: str) -> AsyncIterator[ImmediateApi]:
    async with httpx.AsyncClient() as http:
        yield ImmediateApi(BotApi(TOKEN, http, telegram_root), timeout=5)


async def test_the_fake_answers_every_method_of_the_schema_with_its_result_type_and_records_it(
    api: ImmediateApi, fake: FakeTelegram
) -> None:
    assert len(RESULT_TYPES) == len(METHODS) == 180
    for method, name in METHODS.items():
        if method == "getFile":
            continue  # answered only for files the fake was sent: below
        params = required_params(method)
        typed = getattr(api, name)
        result = await typed(**params)  # decoded into the method's result type, or raises
        expected = get_type_hints(getattr(ApiMethods, name), vars(methods))["return"]
        assert msgspec.convert(msgspec.to_builtins(result), expected) == result, method
        [call] = fake.calls(method)
        assert call.method == method
    sent = await api.send_document(chat_id=5, document="BQACAgIAAxkBAAIC")  # a file_id it never saw
    assert sent.document is not None and sent.document.file_id == "BQACAgIAAxkBAAIC"
    with pytest.raises(Exception, match="invalid file_id"):
        await api.get_file(file_id="BQACAgIAAxkBAAIC")


async def test_the_fake_s_answers_are_deterministic(api: ImmediateApi, fake: FakeTelegram) -> None:
    first = [await api.get_chat(chat_id=5), await api.get_my_commands(), await api.get_star_transactions()]
    fake.reset()
    again = [await api.get_chat(chat_id=5), await api.get_my_commands(), await api.get_star_transactions()]
    assert first == again


# --- the fixtures, used as a bot's tests would --------------------------------------------------


@dataclass
class Seen:
    n: int = 0


def echo_bot() -> Bot[Seen]:
    bot = Bot(session(initial=Seen))

    @bot.message()
    async def echo(ctx: Context[Seen]) -> None:
        ctx.session.n += 1
        user = ctx.from_user
        ctx.reply(f"{user.first_name if user else '?'} #{ctx.session.n}")

    return bot


async def test_the_webhook_fixture_serves_a_bot_on_both_storages(
    storage: Storage, webhook: OpenWebhook
) -> None:
    async with webhook(echo_bot(), storage) as hook:
        first = updates.text_update(1, -9, "hi", from_id=101)
        assert (await hook.post(first)).status_code == 200
        await hook.send(first)  # delivered again: applied once
        await hook.send(updates.text_update(2, -9, "hi", from_id=102))
        assert (await hook.post(first, secret="wrong")).status_code == 401
        replies = await hook.replies(-9, 2)
    assert replies == [f"{updates.user(101)['first_name']} #1", f"{updates.user(102)['first_name']} #2"]


def test_a_bot_process_closed_takes_what_its_shell_started_with_it(tmp_path: Path) -> None:
    """A platform's command line runs through `sh -c`, where the shell may stay the bot's parent:
    closing killed only the shell, and the bot kept serving after its test (four left by
    test_platforms.py in one run)."""
    pid_file = tmp_path / "child.pid"
    process = BotProcess(
        {}, tmp_path / "sh.log", command=["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"]
    )
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the shell did not start its child"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    process.close()
    deadline = time.monotonic() + 10
    while _running(child):  # killed; the init process reaps it a moment later
        assert time.monotonic() < deadline, f"the shell's child {child} outlived close()"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
