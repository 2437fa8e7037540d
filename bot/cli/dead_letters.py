"""`dead-letters` and `replay`: the updates that failed for good (bot.dead_letters), listed or shown one
by one, and run again once the code is fixed."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
from typing import Any

from ..config import Settings
from ..dead_letters import Replayed, describe_letter, replay_all, table
from ..dispatch import Bot
from ..pipeline import Status
from ..runtime import start
from ..storage import DeadLetter
from ..storage.postgres import PostgresStorage
from .base import Fail, bot_to_run, database, require_migrated

__all__ = ["dead_letters", "replay"]


async def _listed(settings: Settings) -> list[DeadLetter]:
    await require_migrated(settings)
    assert settings.database_url is not None
    storage = await PostgresStorage.connect(settings.database_url, max_size=1, pooler=settings.db_pooler)
    try:
        return await storage.dead_letters(settings.bot_id)
    finally:
        await storage.close()


def dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings, bot_to_run(settings, args).name) as live:
        letters = asyncio.run(_listed(live))
    if args.update_id is None:
        print(table(letters, shutil.get_terminal_size((160, 24)).columns))
        return 0
    for letter in letters:
        if letter.update_id == args.update_id:
            print(describe_letter(letter))
            return 0
    raise Fail(f"update {args.update_id} is not a dead letter (`python -m bot dead-letters` lists them)")


async def _replay_now(settings: Settings, bot: Bot[Any], update_id: int | None) -> list[Replayed]:
    await require_migrated(settings)
    async with start(settings, bot=bot) as runtime:
        letters = await runtime.storage.dead_letters(runtime.me.id)
        if update_id is not None:
            letters = [letter for letter in letters if letter.update_id == update_id]
            if not letters:
                raise Fail(
                    f"update {update_id} is not a dead letter (`python -m bot dead-letters` lists them)"
                )
        replayed = await replay_all(runtime.pipeline, letters)
        for one in replayed:
            runtime.outbox.send_soon(one.to_send)  # start() waits for them before it returns
        still = {letter.update_id: letter for letter in await runtime.storage.dead_letters(runtime.me.id)}
        return [
            dataclasses.replace(
                r, note=f"{r.note} (attempt {still[r.update_id].attempts}): {still[r.update_id].error}"
            )
            if r.status is Status.DEAD_LETTER and r.update_id in still
            else r
            for r in replayed
        ]


def replay(settings: Settings, args: argparse.Namespace) -> int:
    bot = bot_to_run(settings, args)
    with database(settings, bot.name) as live:
        replayed = asyncio.run(_replay_now(live, bot, None if args.all else args.update_id))
    for one in replayed:
        print(f"update {one.update_id}: {one.note}")
    if not replayed:
        print("no dead letters")
    return 0 if all(one.done for one in replayed) else 1
