"""The event loop's lag (bot/loop_lag.py): blocking code in a handler froze every chat, and nothing
showed it."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

from bot.context import Context
from bot.dispatch import Bot
from bot.filters import text
from bot.loop_lag import LoopLag
from bot.metrics import Metrics
from bot.testing.plugin import OpenWebhook
from bot.testing.updates import message_update

pytestmark = pytest.mark.anyio

METRICS_TOKEN = "scrape-token-0123456789"
LAG = "bot_event_loop_lag_seconds"


def blocking_bot() -> Bot[None]:
    bot: Bot[None] = Bot()

    @bot.message(text(equals="block"))
    async def block(ctx: Context[None]) -> None:
        time.sleep(0.8)  # noqa: ASYNC251 (the bug the watch is for)
        ctx.reply("done")

    return bot


def lag_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bot.loop" and r.levelno == logging.WARNING]


async def test_a_handler_that_blocks_the_event_loop_shows_in_the_lag_metric_and_a_warning(
    webhook: OpenWebhook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "bot.loop")
    async with webhook(blocking_bot(), METRICS_TOKEN=METRICS_TOKEN) as hook:
        await asyncio.sleep(0.1)  # the watch under way, as in a bot that has been running a while
        await hook.send(message_update(1, -5, "block"))
        assert await hook.replies(-5) == ["done"]
        for _ in range(40):  # the watch wakes at last once the block ends
            if lag_lines(caplog):
                break
            await asyncio.sleep(0.05)
        scraped = await hook.http.get("/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    samples = {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in scraped.text.splitlines() if line.startswith(LAG))
    }
    # The block woke the watch 0.3 to 0.8 s late, as its 0.5 s sleep was under way.
    assert samples[f"{LAG}_count"] - samples[f'{LAG}_bucket{{le="0.25"}}'] >= 1
    [line] = lag_lines(caplog)  # (at most one per 10 s)
    found = re.match(r"the event loop was held up for (\d\.\d{3}) s: every chat waited", line)
    assert found is not None and 0.3 <= float(found[1]) <= 1.5, line
    assert "-5" not in line  # nothing of the chat or the user


def test_lags_past_the_threshold_are_logged_at_most_once_per_log_every_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "bot.loop")
    metrics = Metrics()
    watch = LoopLag(metrics, warn_after=0.25, log_every=0.2)
    for lag in (0.001, 0.3, 0.6, 0.4):
        watch.observe(lag)
    assert lag_lines(caplog) == [
        "the event loop was held up for 0.300 s: every chat waited (a handler's blocking call: time.sleep,"
        " a CPU-bound loop, a synchronous client; await it, or run it in a thread; or more work than the"
        " process can do)"
    ]
    time.sleep(0.25)
    watch.observe(0.26)
    assert lag_lines(caplog)[1].endswith("; 2 more since the last line, the worst 0.600 s")
    assert metrics.count(f"{LAG}_count") == 5
    assert metrics.count(f"{LAG}_bucket", le="0.25") == 1
