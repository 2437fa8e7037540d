"""The bot as an installation, not a checkout: what a Docker image, Heroku or `pip install .` gets."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import pytest

from bot.app import SECRET_HEADER
from bot.apps.pizza_testing import PIZZA, hunger
from bot.migrate import MIGRATIONS_DIR
from bot.testing.env import bot_env
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import BotProcess
from bot.testing.updates import encode, message_update

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_migrations_live_only_inside_the_package() -> None:
    assert sorted(MIGRATIONS_DIR.glob("*.sql")), MIGRATIONS_DIR
    assert MIGRATIONS_DIR.parent == ROOT / "bot"
    # A new migration added where they used to be would be left out of every install.
    assert not list(ROOT.glob("migrations/*.sql"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of what the project ships (no build/ or egg-info in the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "bot", source / "bot", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, source],
        check=True,
        timeout=120,
    )
    [built] = out.glob("pizza_bot-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv with the wheel installed (not editable); its dependencies are borrowed from the test
    venv, added as a plain path so that the editable install there cannot be imported instead."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        timeout=120,
    )
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "test-venv-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def test_the_wheel_carries_every_migration(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for migration in MIGRATIONS_DIR.glob("*.sql"):
        assert f"bot/migrations/{migration.name}" in names


def test_an_installed_wheel_migrates_an_empty_database_serves_and_counts(
    installed: Path, empty_database_url: str, fake: FakeTelegram, telegram_root: str, tmp_path: Path
) -> None:
    where = subprocess.run(
        [installed, "-c", "import bot; print(bot.__file__)"], cwd=tmp_path, capture_output=True, text=True
    )
    assert where.stdout.startswith(str(installed.parent.parent)), where  # the installed copy, not ours
    env = bot_env(empty_database_url, telegram_root)
    migrated = subprocess.run(
        [installed, "-m", "bot", "migrate"],
        cwd=tmp_path,
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrated.returncode == 0, migrated.stderr
    expected = ", ".join(sorted(path.name for path in MIGRATIONS_DIR.glob("*.sql")))
    assert migrated.stdout.strip() == f"applied: {expected}"
    with BotProcess(env, tmp_path / "serve.log", python=str(installed), cwd=tmp_path) as process:
        process.wait_ready()
        headers = {SECRET_HEADER: env["WEBHOOK_SECRET"], "content-type": "application/json"}
        for update in (message_update(1, -5, PIZZA), hunger(2, -5)):
            response = httpx.post(process.url + "/webhook", content=encode(update), headers=headers)
            assert response.status_code == 200
        fake.wait_for(lambda: len(fake.sent_messages(-5)) >= 1, timeout=20)
    assert fake.sent_messages(-5)[0]["text"] == "Your hunger level is 1!"


def test_the_wheel_is_typed_and_leaves_the_generator_out(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"bot/py.typed", "bot/types.py", "bot/methods.py", "bot/kinds.py"} <= names
    assert not [name for name in names if name.startswith("bot/_gen/")]


USER_BOT = """
from __future__ import annotations

from dataclasses import dataclass

from bot.context import Context
from bot.dispatch import Bot
from bot.keyboards import button, inline_keyboard, reply_keyboard
from bot.session import session, user_key
from bot.types import InlineQueryResultArticle, InputTextMessageContent, Message, ReactionTypeEmoji


@dataclass
class Count:
    n: int = 0


def build_bot() -> Bot[Count]:
    bot: Bot[Count] = Bot(session(initial=Count), sessions={"me": session(initial=Count, get_session_key=user_key)})

    @bot.command("start")
    async def start(ctx: Context[Count]) -> None:
        ctx.session.n += 1
        assert ctx.message is not None and ctx.message.from_user is not None
        language: str | None = ctx.message.from_user.language_code
        ctx.reply(f"hi ({language})", reply_markup=inline_keyboard([button("+1", "inc")]))

    @bot.callback_query()
    async def inc(ctx: Context[Count]) -> None:
        assert ctx.chat is not None
        sent: Message = await ctx.api.send_message(chat_id=ctx.chat.id, text="now")
        ctx.outbox.edit_message_text(chat_id=ctx.chat.id, message_id=sent.message_id, text="later")
        ctx.outbox.send_message(chat_id=ctx.chat.id, text="pick", reply_markup=reply_keyboard(["a", "b"]))
        ctx.answer()

    @bot.inline_query()
    async def inline(ctx: Context[Count]) -> None:
        query = ctx.inline_query
        if query is None:
            return
        article = InlineQueryResultArticle(
            id="1", title=query.query, input_message_content=InputTextMessageContent(message_text=query.query)
        )
        ctx.outbox.answer_inline_query(inline_query_id=query.id, results=[article], cache_time=0)

    @bot.message_reaction()
    async def reaction(ctx: Context[Count]) -> None:
        update = ctx.message_reaction
        if update is not None and any(isinstance(r, ReactionTypeEmoji) for r in update.new_reaction):
            ctx.fragment("me").n += 1

    return bot
"""


def test_a_bot_in_another_folder_passes_mypy_strict_against_the_installed_wheel(
    installed: Path, tmp_path: Path
) -> None:
    (tmp_path / "my_bot.py").write_text(USER_BOT)
    mypy = [installed, "-m", "mypy", "--strict", "--cache-dir", tmp_path / ".mypy_cache", "my_bot.py"]
    checked = subprocess.run(mypy, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # ...and the types are really read: a misspelt parameter is an error, not Any.
    (tmp_path / "my_bot.py").write_text(USER_BOT.replace('text="later"', 'txt="later"'))
    checked = subprocess.run(mypy, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert checked.returncode == 1 and 'Unexpected keyword argument "txt"' in checked.stdout, checked.stdout
