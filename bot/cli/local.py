"""`poll` and `chat`: a bot run where Telegram cannot reach it. `poll` asks Telegram for updates
(getUpdates) instead of serving a webhook; `chat` talks to a running local bot from the terminal, through
its playground."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

import msgspec

from ..config import Settings
from ..dispatch import Bot
from ..failures import TryLater
from ..runtime import start
from ..telegram import BotApiError, InvalidUpdate, decode_update
from .base import Fail, bot_to_run, database, log

__all__ = ["chat", "poll"]

# Seconds getUpdates waits for an update before answering with none.
_LONG_POLL = 5


async def _poll_forever(settings: Settings, bot: Bot[Any]) -> None:
    async with start(settings, bot=bot) as runtime:
        assert runtime.api is not None
        log.info("polling for updates as @%s (Ctrl-C to stop)", runtime.me.username)
        offset = 0
        allowed_updates = bot.allowed_updates()
        while True:
            try:
                raw = await runtime.api.call(
                    "getUpdates",
                    {"offset": offset, "timeout": _LONG_POLL, "allowed_updates": allowed_updates},
                    timeout=_LONG_POLL + runtime.api.timeout,  # Telegram holds it open that long
                )
            except BotApiError as exc:
                if exc.error_code == 409:
                    raise Fail(
                        "getUpdates: a webhook is set; run `python -m bot delete-webhook` first"
                    ) from exc
                log.warning("getUpdates failed: %s", exc)
                await asyncio.sleep(exc.retry_after or 2)
                continue
            for item in raw:
                try:
                    update = decode_update(msgspec.json.encode(item))
                except InvalidUpdate as exc:
                    log.warning("skipping an update that does not decode: %s", exc)
                    offset = max(offset, int(item.get("update_id", offset - 1)) + 1)
                    continue
                # Offset moves past an update only once it is committed, applied or as a dead letter: a
                # database outage means the same update again, as with a webhook's 503.
                while True:
                    try:
                        outcome = await runtime.pipeline.process(update)
                        break
                    except TryLater as exc:
                        log.warning("update %d not applied, retrying: %s", update.update_id, exc)
                        await asyncio.sleep(1)
                runtime.outbox.send_soon(outcome.to_send)
                offset = update.update_id + 1


async def _poll_until_stopped(settings: Settings, bot: Bot[Any]) -> None:
    """`_poll_forever` until SIGINT or SIGTERM, then the runtime's orderly shutdown. Both are handled
    here, whatever the process inherited: a shell starts a background job (`python -m bot poll &`) with
    SIGINT ignored, which Python then leaves ignored (Ctrl-C or `kill -INT` did nothing), and a
    platform stops a worker with SIGTERM, which by default ends the process at once, sends under way
    and all."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    stopped: list[str] = []

    def stop(name: str) -> None:
        stopped.append(name)
        task.cancel()  # a second signal cancels the shutdown's waits too: stop now

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig.name)
    try:
        await _poll_forever(settings, bot)
    except asyncio.CancelledError:
        if not stopped:
            raise
        log.info("%s: stopped polling", stopped[0])
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def poll(settings: Settings, args: argparse.Namespace) -> int:
    if settings.bot_token is None:
        raise Fail("BOT_TOKEN: required for poll (it asks Telegram for updates)")
    bot = bot_to_run(settings, args)
    # KeyboardInterrupt: a Ctrl-C before the loop runs (its handlers are set once polling starts).
    with database(settings, bot.name) as settings, contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_poll_until_stopped(settings, bot))
    return 0


def chat(settings: Settings, args: argparse.Namespace) -> int:
    from ..playground.terminal import ChatError, run

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104
    try:
        run(args, f"http://{host}:{settings.port}")
    except ChatError as exc:
        raise Fail(str(exc)) from exc
    return 0
