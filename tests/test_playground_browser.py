"""The playground in a real headless Chromium, against a real `python -m bot serve` in the local trial.

Needs Debian's `chromium` and `chromium-driver` (and `fonts-noto-color-emoji` for 🍕 in the screenshot),
which .ci/run installs; skipped, saying so, where they are not installed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bot.testing.processes import BotProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Chromium and its driver: apt-get install chromium chromium-driver (as .ci/run does)",
    ),
]

# Per the machine notes: root needs --no-sandbox; nothing may reach out to the network.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,860",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def trial(database_url: str, tmp_path: Path, **env: str) -> Iterator[BotProcess]:
    """`python -m bot serve` as in the README's run command: no token, so the local trial."""
    assert "BOT_TOKEN" not in os.environ, "the local trial is a bot without a token"
    with BotProcess({"DATABASE_URL": database_url, **env}, tmp_path / "bot.log") as bot:
        bot.wait_ready()
        yield bot


def all_text(browser: Any, selector: str) -> list[str]:
    """The text of every match, read in one script: the page redraws its lists, and an element found a
    moment ago may be gone."""
    found: list[str] = browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)", selector
    )
    return found


def opened(browser: Any, bot: BotProcess) -> tuple[Any, Callable[[str], list[str]]]:
    """The playground of `bot`, connected, with its first group open: a wait, and `texts(selector)`."""
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    texts = partial(all_text, browser)
    browser.get(bot.url + "/")
    wait.until(lambda _: texts("#chat-title") == ["First group"] and texts("#link") == ["connected"])
    return wait, texts


@pytest.fixture
def local_bot(database_url: str, tmp_path: Path) -> Iterator[BotProcess]:
    yield from trial(database_url, tmp_path)


def test_the_playground_counts_in_two_groups_and_ignores_a_redelivery(
    browser: Any, local_bot: BotProcess, tmp_path: Path
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 20)
    texts = partial(all_text, browser)

    def click(selector: str, containing: str = "") -> None:
        """Click the first match, found afresh until the click lands (the page may redraw meanwhile)."""

        def attempt(_: Any) -> bool:
            for element in browser.find_elements(By.CSS_SELECTOR, selector):
                try:
                    if containing in element.text:
                        element.click()
                        return True
                except StaleElementReferenceException:
                    return False
            return False

        wait.until(attempt)

    def delivered(count: int) -> None:
        wait.until(lambda _: sum(t.startswith("✓ 200") for t in texts(".msg.in .status")) == count)

    browser.get(local_bot.url + "/")
    # A first visit opens a group of its own.
    wait.until(lambda _: texts("#chat-title") == ["First group"] and texts("#link") == ["connected"])
    for _ in range(3):
        click("#quick button", "🍕")
    delivered(3)
    click("#quick button", "/hunger")  # the first: without @name
    wait.until(lambda _: "Your hunger level is 3!" in texts(".msg.bot p"))
    wait.until(lambda _: texts("#session-rows .data") == ['{"pizza_count":3}'])

    Select(browser.find_element(By.ID, "new-type")).select_by_value("group")
    browser.find_element(By.ID, "new-title").send_keys("Second group")
    browser.find_element(By.ID, "create-chat").click()
    wait.until(lambda _: texts("#chat-title") == ["Second group"])
    click("#quick button", "🍕")
    delivered(1)
    click("#quick button", "/hunger")  # the first: without @name
    wait.until(lambda _: "Your hunger level is 1!" in texts(".msg.bot p"))

    # Telegram delivering the 🍕 message again: recognised, nothing counted twice.
    click(".msg.in .redeliver")
    wait.until(lambda _: any("delivered again ×1" in t for t in texts(".msg.in .status")))
    delivered(2)
    # By keyboard: type, then Enter.
    browser.find_element(By.ID, "text").send_keys("/hunger" + Keys.ENTER)
    wait.until(lambda _: texts(".msg.bot p") == ["Your hunger level is 1!"] * 2)
    assert texts("#session-rows .data") == ['{"pizza_count":1}']

    screenshot = tmp_path / "playground.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")

    # The first group kept its own count.
    click("#chat-list button", "First group")
    wait.until(lambda _: texts("#session-rows .data") == ['{"pizza_count":3}'])


@pytest.fixture
def todo_bot(database_url: str, tmp_path: Path) -> Iterator[BotProcess]:
    """The to-do example in the local trial: a bot with inline buttons that edits its message."""
    yield from trial(database_url, tmp_path, APP="examples.todo:build_bot")


def test_pressing_an_inline_button_shows_the_edited_message_and_text_stays_text(
    browser: Any, todo_bot: BotProcess, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wait, texts = opened(browser, todo_bot)
    # A task whose text is markup: the page must show it, not run it.
    evil = '<img src=x onerror="window.injected = 1">'
    browser.find_element(By.ID, "text").send_keys(f"/add {evil}" + Keys.ENTER)
    wait.until(lambda _: texts(".msg.bot .text") == [f"▫️ 1. {evil}"])
    wait.until(lambda _: texts(".msg.bot .key") == ["✅ 1"])
    browser.find_element(By.CSS_SELECTOR, ".msg.bot .key").click()  # a callback query, through /webhook
    wait.until(lambda _: texts(".msg.press p") == ["Ann pressed “done:1”"])
    wait.until(lambda _: texts(".msg.bot .text") == [f"✅ 1. {evil}"])
    # The same message, edited in place: no second bot message, its keyboard now empty.
    assert texts(".msg.bot .text") == [f"✅ 1. {evil}"]
    assert texts(".msg.bot .key") == [] and texts(".msg.bot .status") == ["edited"]
    wait.until(lambda _: texts("#toast") == ["Done: " + evil])  # answerCallbackQuery's notice
    assert browser.execute_script("return window.injected") is None
    assert browser.execute_script("return document.querySelectorAll('.messages img').length") == 0
    screenshot = tmp_path / "playground-buttons.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")


@pytest.fixture
def shop_bot(database_url: str, tmp_path: Path) -> Iterator[BotProcess]:
    """The shop example in the local trial: photos uploaded from bytes, HTML captions, Buy buttons."""
    yield from trial(database_url, tmp_path, APP="examples.shop:build_bot")


def test_the_shop_s_photos_and_html_captions_show_as_telegram_would(
    browser: Any, shop_bot: BotProcess, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wait, texts = opened(browser, shop_bot)
    loaded = "return [...document.querySelectorAll('.msg.bot img.photo')].filter((i) => i.naturalWidth === 48).length"
    browser.find_element(By.ID, "text").send_keys("/start" + Keys.ENTER)
    # Three photos, uploaded from bytes through the outbox, each drawn from its upload...
    wait.until(lambda _: browser.execute_script(loaded) == 3)
    # ...with its HTML caption as formatting (a <b>, not the text "<b>"), and a button to press.
    assert texts(".msg.bot .text b") == ["Croissant", "Cinnamon roll", "Éclair"]
    assert texts(".msg.bot .text")[0] == "Croissant: 5 ⭐, 3 left"
    browser.find_element(By.CSS_SELECTOR, ".msg.bot .key").click()  # Buy: an invoice, shown as the call
    wait.until(lambda _: any("sendInvoice" in t for t in texts(".msg.service p")))
    screenshot = tmp_path / "playground-shop.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")


@pytest.fixture
def phone(tmp_path: Path) -> Iterator[Any]:
    """Chromium emulating a phone 390 CSS pixels wide (headless Chromium ignores window sizes under
    ~500 px, so the width comes from mobile emulation)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'phone-profile'}"):
        options.add_argument(flag)
    options.add_experimental_option(
        "mobileEmulation", {"deviceMetrics": {"width": 390, "height": 844, "pixelRatio": 3.0}}
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_playground_fits_a_phone_without_scrolling_sideways(
    phone: Any, local_bot: BotProcess, tmp_path: Path
) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    phone.get(local_bot.url + "/")
    WebDriverWait(phone, 20).until(
        lambda _: phone.execute_script("return document.querySelector('#link').textContent") == "connected"
    )
    # A message with a long unbroken line, as people paste links.
    phone.execute_script(
        "document.querySelector('#text').value = 'https://example.com/' + 'x'.repeat(200);"
        "document.querySelector('#composer').requestSubmit()"
    )
    WebDriverWait(phone, 20).until(
        lambda _: phone.execute_script("return document.querySelectorAll('.msg.in').length") >= 1
    )
    width = phone.execute_script("return document.documentElement.clientWidth")
    assert width == 390
    too_wide: list[str] = phone.execute_script(
        """return [...document.querySelectorAll('body *')]
            .filter((e) => e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
            .map((e) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + '.' + e.className)"""
    )
    screenshot = tmp_path / "playground-phone.png"
    phone.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    assert phone.execute_script("return document.documentElement.scrollWidth") <= width, too_wide
    assert too_wide == []
