"""The check after the clock: every chat asked /hunger (as each sender, for the two-session bot) and the
answers compared with what was sent, so lost and extra increments are counted, not assumed."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from workloads import Expected

from bot.apps.pizza_testing import hunger
from bot.testing.delivery import Poster, deliver
from bot.testing.env import SECRET, USERNAME
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.updates import command_update
from bot.types import Update


async def ask(
    client: Poster, urls: list[str], fake: FakeTelegram, asks: list[Update]
) -> list[dict[str, Any]]:
    """Deliver these commands (to the urls in turn) and return the replies sent (chat_id, text...)."""
    fake.reset()
    turn = iter(range(10**9))
    await deliver(client, lambda: urls[next(turn) % len(urls)], SECRET, asks, in_flight=32)
    await fake.wait_for_async(lambda: len(fake.sent_messages()) >= len(asks), timeout=120)
    return fake.sent_messages()


def compare(counts: Mapping[Any, int], expected: Mapping[Any, int]) -> tuple[int, int]:
    """(lost, extra) increments summed over keys."""
    lost = sum(max(0, n - counts.get(key, 0)) for key, n in expected.items())
    extra = sum(max(0, counts.get(key, 0) - n) for key, n in expected.items())
    return lost, extra


async def verify(
    client: Poster, url: str, fake: FakeTelegram, expected: Expected, *, per_user: bool
) -> tuple[int, int]:
    """Ask /hunger in every chat; return (lost, extra) increments summed over chats. `per_user` (the
    two-session bot): asked as each sender, whose own count is checked too and added in."""
    if not per_user:
        chats = sorted(expected.chats)
        replies = await ask(
            client, [url], fake, [hunger(10_000_000 + i, c, username=USERNAME) for i, c in enumerate(chats)]
        )
        return compare({m["chat_id"]: int(re.findall(r"\d+", m["text"])[0]) for m in replies}, expected.chats)
    pairs = sorted(expected.eaters)
    asks = [hunger(10_000_000 + i, c, username=USERNAME, from_id=u) for i, (c, u) in enumerate(pairs)]
    by_chat: dict[int, int] = {}
    by_sender: dict[tuple[int, int], int] = {}
    for message in await ask(client, [url], fake, asks):
        chat_count, user, own = (int(n) for n in re.findall(r"\d+", message["text"]))
        by_chat[message["chat_id"]] = chat_count
        by_sender[message["chat_id"], user] = own
    (lost, extra), (lost_own, extra_own) = (
        compare(by_chat, expected.chats),
        compare(by_sender, expected.eaters),
    )
    return lost + lost_own, extra + extra_own


async def handler_runs(client: Poster, urls: list[str], fake: FakeTelegram) -> int:
    """The two-session bot's count of handler runs, summed over its processes (`/runs` to each)."""
    replies = await ask(
        client, urls, fake, [command_update(20_000_000 + i, 1, "runs") for i in range(len(urls))]
    )
    return sum(int(m["text"].split()[1]) for m in replies)
