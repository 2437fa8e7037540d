"""Durable timers with real processes: `python -m bot serve` on real PostgreSQL, killed with SIGKILL while
its timers fire, then two processes started in its place. Every timer fires exactly once, none early,
and those that came due while no process ran fire when the new ones start, saying how late they are."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from bot.testing.delivery import LoopbackHttp, deliver
from bot.testing.env import FAULT_ENV, SECRET
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import BotProcess
from bot.testing.updates import message_update

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ENV = {
    **FAULT_ENV,
    "APP": "bot.testing.timer_app:build_bot",
    # FAULT_ENV's 0.9 s Bot API deadline (a 1 s lease) is shorter than a loaded CI machine may take to answer
    # getMe at start-up or a reply: a timed-out reply is sent again by the same process (at least once, by
    # design), which this test would read as a doubled fire's reply. A killed process's leases still run
    # out well within the test.
    "OUTBOX_LEASE": "4",
    "BOT_API_TIMEOUT": "3",
    # Every fire replies: let 1,000 replies out as fast as they come.
    "SEND_RATE_GLOBAL": "1000",
    "SEND_RATE_GROUP": "1000",
}
TIMERS, KEYS = 1000, 200
FIRED = re.compile(r"fired (\S+) at (\S+) late (\S+) by (\d+)")


@dataclass(frozen=True)
class Fire:
    tag: str
    ran_at: float  # by the firing process's clock (this machine's)
    late: float  # as the framework told the handler
    pid: int
    arrived: float  # when the fake Bot API got the reply


def fires(fake: FakeTelegram) -> list[Fire]:
    found = []
    for call in fake.calls("sendMessage"):
        match = FIRED.fullmatch(call.params["text"])
        if match is not None:
            tag, ran_at, late, pid = match.groups()
            found.append(Fire(tag, float(ran_at), float(late), int(pid), call.at))
    return found


async def test_a_thousand_timers_fire_once_across_a_kill_9_a_restart_and_two_processes(
    serve_bot: Callable[..., BotProcess], fake: FakeTelegram
) -> None:
    rng = random.Random(19)
    first = serve_bot(**ENV)
    # Due over six seconds from a moment the scheduling is over by (if it is not, some fire during it).
    # Scheduling 1,000 took 10 s on a loaded machine through httpx, under 4 s on a quiet one; through
    # LoopbackHttp, which costs the test process a fraction of httpx's CPU, 0.5 s on a quiet one. It may
    # run up to 3.5 s past `start` (the kill then comes at once, still with over 2 s of due times after it).
    start = time.time() + 5.0
    due = {f"t{n}": start + rng.uniform(0, 6) for n in range(TIMERS)}
    chat_of = {tag: -3000 - n % KEYS for n, tag in enumerate(due)}
    schedules = [
        message_update(n + 1, chat_of[tag], f"/at {at:.6f} {tag}", from_id=7)
        for n, (tag, at) in enumerate(due.items())
    ]
    async with LoopbackHttp(timeout=30) as client:
        stats = await deliver(client, lambda: first.url + "/webhook", SECRET, schedules, in_flight=16)
        assert stats.delivered == TIMERS
        scheduled_at = time.time()

        # Killed a second and a half into the six seconds of due times (by the clock, not by a count of
        # replies, which a loaded machine delays past the last due time): fires committed and under way.
        await fake.wait_for_async(lambda: len(fires(fake)) >= 1, timeout=60)
        await asyncio.sleep(max(0.0, start + 1.5 - time.time()))
        first.kill()  # while it fires: some fires committed, some under way, replies in flight
        killed_at = time.time()
        await asyncio.sleep(2.0)  # timers come due while no process runs
        restarted_at = time.time()
        second, third = await asyncio.gather(
            asyncio.to_thread(serve_bot, **ENV), asyncio.to_thread(serve_bot, **ENV)
        )

        await fake.wait_for_async(lambda: {f.tag for f in fires(fake)} == set(due), timeout=120)
        await asyncio.sleep(1.5)  # a doubled fire or reply would arrive now
        fired = fires(fake)

        # Each fire's effect on its chat's session, counted once: ask every chat.
        asks = [message_update(10_000 + n, -3000 - n, "/fired", from_id=7) for n in range(KEYS)]
        before = len(fake.sent_messages())
        await deliver(client, lambda: second.url + "/webhook", SECRET, asks, in_flight=16)

        def lists() -> dict[int, list[str]]:
            later = fake.sent_messages()[before:]
            return {m["chat_id"]: m["text"].split() for m in later if not FIRED.fullmatch(m["text"])}

        await fake.wait_for_async(lambda: len(lists()) == KEYS, timeout=60)
        listed = lists()

    expected: defaultdict[int, list[str]] = defaultdict(list)
    for tag, chat in chat_of.items():
        expected[chat].append(tag)
    assert {chat: sorted(tags) for chat, tags in listed.items()} == {
        c: sorted(t) for c, t in expected.items()
    }
    for chat, tags in listed.items():
        # A key's timers fire in the order they are due (among those scheduled before the first was due).
        waited = [tag for tag in tags if due[tag] > scheduled_at]
        assert waited == sorted(waited, key=due.__getitem__), chat

    # None early, by the clock the due times were set by.
    early = [f for f in fired if f.ran_at < due[f.tag]]
    assert early == []

    # One reply per fire. Telegram has no idempotency key: a reply the killed process had sent but not yet
    # recorded as sent goes out again from a new process. Only those may be doubled, and only that way.
    per_tag = Counter(f.tag for f in fired)
    doubled = sorted(tag for tag, n in per_tag.items() if n > 1)
    for tag in doubled:
        copies = sorted((f for f in fired if f.tag == tag), key=lambda f: f.arrived)
        assert len(copies) == 2 and copies[0].pid == first.proc.pid, copies
        # The killed process's copy, then one sent again after the restart (the text names the process
        # that fired, not the one that sent; arrival is stamped by the fake when it handles a call, which
        # on a loaded machine may be a little after a kill the call preceded).
        assert copies[0].arrived < restarted_at < copies[1].arrived, copies
        assert copies[0].ran_at == copies[1].ran_at, "the same fire's reply, sent twice: not a second fire"

    # What came due while nothing ran fired after the restart, late by at least the time it waited.
    missed = [f for f in fired if killed_at + 0.1 < due[f.tag] < restarted_at - 0.1]
    assert len(missed) > 50
    assert all(f.pid in (second.proc.pid, third.proc.pid) for f in missed)
    assert all(f.late >= restarted_at - due[f.tag] - 0.01 for f in missed)
    # And both new processes took part.
    assert {second.proc.pid, third.proc.pid} <= {f.pid for f in fired}
    # No fire's handler failed (bot.pipeline's ERROR line, written at once: complete while they run).
    for process in (first, second, third):
        assert "failed and is kept as failed" not in process.output()
    print(
        f"\n{TIMERS} timers over {KEYS} keys: {len(fired) - len(per_tag)} replies doubled by the kill,"
        f" {len(missed)} fired late after the restart (up to {max(f.late for f in missed):.1f} s),"
        f" by pid: {dict(Counter(f.pid for f in fired))}"
    )
