"""The long-lived parts of a running bot, opened and closed together: HTTP client, pool, sweeper, and
the timer loop (for a bot with timer handlers).

Both ways of receiving updates (the webhook app and `poll`) run inside `start()`, so they share one
shutdown order: stop firing timers and let the fires under way finish, stop the sweeper, let in-flight
replies finish, then close the pool and the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from .config import TRIAL_USERNAME, Settings
from .context import BotIdentity
from .dispatch import Bot
from .errors import BotError
from .failures import TransientFailures
from .importer import AppError, load_app
from .loop_lag import LoopLag
from .metrics import Metrics
from .outbox import Limits, Outbox
from .pipeline import Pipeline
from .storage import Storage
from .storage.postgres import PostgresStorage
from .telegram import BotApi, BotApiError
from .timers import TimerLoop

__all__ = ["Runtime", "StartupError", "bot_api", "start"]

log = logging.getLogger("bot.runtime")

# What a trial's Bot API client puts in its URLs; only the in-process stand-in ever sees it.
_TRIAL_TOKEN = "0:local-trial"  # noqa: S105


class StartupError(BotError):
    """The bot cannot start; the message says why and which setting to look at."""


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    storage: Storage
    api: BotApi | None
    me: BotIdentity
    pipeline: Pipeline
    outbox: Outbox
    metrics: Metrics
    timers: TimerLoop | None = None  # None: the bot has no timer handlers, and nothing looks for any


def bot_api(settings: Settings, client: httpx.AsyncClient, token: str) -> BotApi:
    """The Bot API client: calls go to TELEGRAM_API_ROOT, each within BOT_API_TIMEOUT in all."""
    return BotApi(token, client, settings.telegram_api_root, timeout=settings.bot_api_timeout)


def send_limits(settings: Settings) -> Limits:
    return Limits(
        per_second=settings.send_rate_global,
        group_per_minute=settings.send_rate_group,
        private_per_second=settings.send_rate_private,
        backoff_max=settings.outbox_backoff_max,
        give_up_after=settings.outbox_give_up,
        bot_pause_max=settings.send_pause_max,
    )


async def resolve_identity(settings: Settings, api: BotApi | None) -> BotIdentity:
    """Our username decides which `/cmd@name` commands are ours: BOT_USERNAME if set, else getMe's."""
    if api is None or settings.bot_username is not None:
        return BotIdentity(settings.bot_id, settings.bot_username or TRIAL_USERNAME)
    try:
        me = await api.get_me()
    except BotApiError as exc:
        raise StartupError(f"BOT_TOKEN: getMe at {settings.telegram_api_root} failed: {exc}") from exc
    if me.can_read_all_group_messages is False:
        log.warning(
            "privacy mode is on for @%s: in groups it sees only commands and replies to it, not other"
            " messages. Turn it off in @BotFather (/setprivacy → Disable), then remove and re-add the bot.",
            me.username,
        )
    return BotIdentity(me.id, me.username or TRIAL_USERNAME)


@asynccontextmanager
async def start(
    settings: Settings,
    *,
    bot: Bot[Any] | None = None,
    storage: Storage | None = None,
    bot_api_transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Runtime]:
    """Open everything, yield, close everything. Without a `bot`, the one the APP setting names runs. A
    given `storage` is used, not closed.

    `bot_api_transport` carries the Bot API calls (the playground's in-process stand-in); with it, a
    local trial without a token sends its replies there instead of only logging them.
    """
    if bot is None:
        try:
            bot = load_app(settings.app)
        except AppError as exc:
            raise StartupError(f"APP: {exc}") from exc
    metrics = Metrics()
    # BOT_API_TIMEOUT is each call's total deadline (BotApi); httpx's own timeouts bound each step
    # inside it, a connect to 5 s.
    timeout = httpx.Timeout(settings.bot_api_timeout, connect=5.0)
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=bot_api_transport) as http:
        token = settings.bot_token or (_TRIAL_TOKEN if bot_api_transport is not None else None)
        api = bot_api(settings, http, token) if token else None
        # Without a token there is nobody to ask getMe: the trial's name comes from the settings.
        me = await resolve_identity(settings, api if settings.bot_token else None)
        owned: Storage | None = None
        if storage is None:
            if settings.database_url is None:
                raise StartupError("DATABASE_URL: not set (the command line starts a local database for you)")
            storage = owned = await PostgresStorage.connect(
                settings.database_url,
                min_size=settings.db_pool_min,
                max_size=settings.db_pool_max,
                acquire_timeout=settings.db_acquire_timeout,
                lock_timeout=settings.db_lock_timeout,
                statement_timeout=settings.db_statement_timeout,
                application_name=bot.name,
                metrics=metrics,
                pooler=settings.db_pooler,
                cache_size=settings.session_cache,
            )
        try:
            outbox = Outbox(storage, api, metrics, lease=settings.outbox_lease, limits=send_limits(settings))
            pipeline = Pipeline(
                bot,
                storage,
                me,
                metrics,
                lease=settings.outbox_lease,
                api=api,
                api_timeout=settings.api_call_timeout,
                optimistic=settings.db_optimistic,
                deadline=settings.request_deadline,
                give_up=TransientFailures(settings.dead_letter_after, settings.dead_letter_after_seconds),
                max_upload_bytes=settings.upload_max_bytes,
            )
            sweeper = asyncio.create_task(outbox.run_sweeper(settings.sweep_interval))
            watch = asyncio.create_task(LoopLag(metrics).run())  # a blocking handler shows (bot.loop_lag)
            timers = firing = None
            if bot.timers:
                timers = TimerLoop(
                    pipeline,
                    outbox,
                    lease=settings.outbox_lease,
                    interval=settings.sweep_interval,
                    concurrency=settings.timer_concurrency,
                )
                pipeline.on_schedule = timers.wake
                firing = asyncio.create_task(timers.run())
            try:
                yield Runtime(settings, storage, api, me, pipeline, outbox, metrics, timers)
            finally:
                try:
                    # One SHUTDOWN_TIMEOUT for the fires and the sends together.
                    ends = asyncio.get_running_loop().time() + settings.shutdown_timeout
                    if timers is not None and firing is not None:
                        firing.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await firing
                        # Fires still running finish first: their replies are queued before the close below.
                        await timers.drain(settings.shutdown_timeout)
                    sweeper.cancel()
                    # The sweeper ends only by this cancellation (it survives every error), so the close
                    # below always runs, and every send has ended before the pool and the client close.
                    with contextlib.suppress(asyncio.CancelledError):
                        await sweeper
                    await outbox.close(max(0.0, ends - asyncio.get_running_loop().time()))
                finally:
                    watch.cancel()  # (nothing of its own to finish: awaited only to be done with it)
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch
                    # The last second's counts of lines not written, and their timers off the loop.
                    pipeline.update_lines.flush()
                    pipeline.timer_lines.flush()
        finally:
            if owned is not None:
                await owned.close()
