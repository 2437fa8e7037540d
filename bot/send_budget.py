"""The send budget: how many Bot API sends may go to a chat and for the whole bot within a window, and
when a 429 pauses one chat or every send. The rule lives here, and only here:

- the budgets a send takes a slot in (`budgets_for`): the whole bot's, and its chat's (a private chat's
  or a group's), each as GCRA parameters (`Budget`, built by `budget`);
- GCRA itself: a send may go once the budget's `next_at` less its burst allowance (and any pause) has
  passed (`wait`), and moves `next_at` one interval on (`next_at_after`); `burst_again_at` is when a
  spent budget has a whole burst of slots again;
- the whole bot's send meter (`recent_sends`), and when a 429 is the whole bot's limit rather than its
  chat's (`FloodRule`, `flood_rule`, `limited_lately`, `whole_bot_limited`) and how long that pause
  lasts (`bot_paused_until`).

The numbers are settings (`bot.outbox.Limits`: SEND_RATE_*, SEND_PAUSE_MAX); the constants below are the
rule's own. The storage keeps each budget's state where every process shares it and applies the rule in
one atomic step per send: `MemoryStorage` by calling the functions here, PostgreSQL in its functions
`reserve_send` and `pause_sends` (migrations/005_send_leases_and_flood_evidence.sql; 003's versions
are the previous release's and unused), which take every number from their arguments and compute the
same formulas in SQL, since SQL cannot call these. A change to a formula here therefore needs a
migration replacing those functions; `bot.testing.conformance` holds both storages to the same answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "FLOOD_CHATS",
    "FLOOD_SHARE",
    "FLOOD_WITHIN",
    "SEND_MARGIN",
    "WHOLE_BOT",
    "Budget",
    "FloodRule",
    "bot_paused_until",
    "budget",
    "budgets_for",
    "burst_again_at",
    "flood_rule",
    "limited_lately",
    "next_at_after",
    "recent_sends",
    "wait",
    "whole_bot_limited",
]

# The whole bot's budget's key; every other key is a chat id.
WHOLE_BOT = "*"
# Seconds of jitter between reserving a slot and the request reaching Telegram, allowed for in budgets
# (measured on loopback under load: bench/README.md, "Outbox burst").
SEND_MARGIN = 0.1
# What counts as the whole bot's flood limit (FloodRule): 429s from this many chats within this many
# seconds, while the bot sends at least this share of its per-second budget. A busy group's 429 (its own
# 20 a minute) comes without the rate; a few groups at once rarely come with it.
FLOOD_CHATS = 3
FLOOD_WITHIN = 10.0
FLOOD_SHARE = 0.5
# The send meter forgets a send after about a second (decay e^-seconds); past this many seconds it is
# taken as empty (PostgreSQL's exp() of a large negative number is an underflow error, not 0).
METER_SPAN = 60.0


@dataclass(frozen=True, slots=True)
class Budget:
    """A rate budget: at most `burst` sends at once, then one per `interval` seconds (GCRA)."""

    key: str
    interval: float
    burst: int = 1


@dataclass(frozen=True, slots=True)
class FloodRule:
    """When a 429 counts as the whole bot's flood limit rather than its chat's.

    Telegram does not say which limit a 429 is for. A chat's own limit is the usual one (20 a minute in
    a group), and pausing every chat for it would let one busy group silence the bot. So only this
    counts as the bot's: `chats` distinct chats answered 429 within `within` seconds, while the whole
    bot has been sending at least `rate` sends a second. Such a pause lasts the 429's retry_after, and
    never more than `pause_max` seconds.
    """

    chats: int = 3
    within: float = 10.0
    rate: float = 15.0
    pause_max: float = 30.0


def budget(key: str, count: int, per: float, *, burst: int) -> Budget:
    """At most `count` sends in any `per` seconds, `burst` of them back to back.

    GCRA allows burst + ceil(window / interval) - 1 sends in a window. The window is taken SEND_MARGIN
    longer than `per`: sends reserved a few milliseconds apart can reach Telegram closer together than
    that (one request waits for a connection, the next does not), and the limit is counted there.
    """
    burst = max(1, min(burst, count))
    return Budget(key, (per + SEND_MARGIN) / (count - burst + 1), burst)


def budgets_for(
    chat: str | None, *, per_second: int, group_per_minute: int, private_per_second: int
) -> list[Budget]:
    """The budgets a send to `chat` takes a slot in. A positive chat id is a user (a private chat);
    negative ids and @usernames are groups and channels."""
    budgets = [budget(WHOLE_BOT, per_second, 1.0, burst=3)]
    if chat is not None:
        if chat.lstrip("-").isdigit() and int(chat) > 0:
            budgets.append(budget(chat, private_per_second, 1.0, burst=1))
        else:
            budgets.append(budget(chat, group_per_minute, 60.0, burst=3))
    return budgets


def flood_rule(per_second: int, pause_max: float) -> FloodRule:
    return FloodRule(FLOOD_CHATS, FLOOD_WITHIN, FLOOD_SHARE * per_second, pause_max)


def wait(b: Budget, next_at: float, paused_until: float, now: float) -> float:
    """Seconds until `b` allows a send (<= 0: now), given its state."""
    return max(paused_until, next_at - b.interval * (b.burst - 1)) - now


def next_at_after(b: Budget, next_at: float, now: float) -> float:
    """`b`'s next_at once a send took a slot in it at `now`."""
    return max(next_at, now) + b.interval


def burst_again_at(b: Budget, allows_at: float) -> float:
    """When a budget that allows one send at `allows_at` allows a whole burst again."""
    return allows_at + b.interval * (b.burst - 1)


def recent_sends(sends: float, sends_at: float, now: float) -> float:
    """About how many sends the last second held: the meter decayed by e^(-seconds since)."""
    return sends * math.exp(-min(max(now - sends_at, 0.0), METER_SPAN))


def limited_lately(rule: FloodRule, limited_at: float, now: float) -> bool:
    """Whether a chat whose last 429 came at `limited_at` counts towards `rule.chats`."""
    return limited_at > now - rule.within


def whole_bot_limited(rule: FloodRule, chats_limited: int, sends_per_second: float) -> bool:
    """Whether a 429 is the whole bot's limit: enough chats got one lately while the bot sent fast."""
    return chats_limited >= rule.chats and sends_per_second >= rule.rate


def bot_paused_until(rule: FloodRule, until: float, now: float) -> float:
    """The end of a whole-bot pause for a 429 asking to wait until `until`."""
    return min(until, now + rule.pause_max)
