"""The workloads of ../shared/ACCEPTANCE.md (bench/run.py's `-w`), the updates each delivers, and what the
bots must answer once they are delivered."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace

from bot.apps.pizza_testing import PIZZA
from bot.testing.updates import message_update
from bot.types import Update


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    chats: int
    per_chat: int
    in_flight: int
    pizza_share: float
    duplicate_share: float = 0.0
    one_per_chat: bool = False

    def quick(self) -> Workload:
        """A tenth of the updates, for a smoke run: a tenth of the chats, or of one chat's messages."""
        if self.chats > 1:
            return replace(self, chats=self.chats // 10)
        return replace(self, per_chat=self.per_chat // 10)


WORKLOADS = {
    w.name: w
    for w in (
        Workload("A", "many chats", 1000, 10, 32, 0.5),
        Workload("B", "hot chat", 1, 2000, 32, 1.0),
        Workload("C", "redeliveries", 100, 20, 16, 0.5, duplicate_share=0.1),
        Workload("T", "Telegram-like", 1000, 10, 40, 0.5, one_per_chat=True),
        Workload("G", "one busy group", 1, 1000, 1, 0.5),
    )
}


SENDERS = 2  # people writing in each chat, each only there: two-session updates that no other chat's touch


def sender(chat: int, message: int) -> int:
    return 2_000_000 + chat * SENDERS + message % SENDERS


@dataclass(frozen=True)
class Expected:
    """What the bots must answer at the end: each chat's count, and each (chat, sender)'s own."""

    chats: Counter[int]
    eaters: Counter[tuple[int, int]]


def make_updates(w: Workload, seed: int = 7) -> tuple[list[Update], Expected]:
    rng = random.Random(seed)
    updates: list[Update] = []
    expected = Expected(Counter(), Counter())
    update_id = 1
    for chat in range(w.chats):
        chat_id = -100_000 - chat
        expected.chats[chat_id] += 0
        for n in range(w.per_chat):
            pizza = rng.random() < w.pizza_share
            text = f"{PIZZA} please" if pizza else "hi all"
            user = sender(chat, n)
            updates.append(message_update(update_id, chat_id, text, from_id=user))
            expected.chats[chat_id] += pizza
            expected.eaters[chat_id, user] += pizza
            update_id += 1
    if not w.one_per_chat and w.in_flight > 1:
        rng.shuffle(updates)  # Telegram-like keeps each chat's order; the others don't need to
    return updates, expected
