"""What one process remembers between updates of a chat, for the optimistic transaction: pure, no I/O.

`SessionCache` keeps the sessions this process last read or wrote with the row version they had (the
row's `xmin` and the server's start time, so that a version from before a restore or a failover never
matches one after it), so the next update of that chat can skip the read: its one statement writes only
if the row still has that version, which is exactly the check a fresh read would have been followed by.
A copy that went stale (another process wrote the chat, or the database went back in time) costs one
conflict, answered with the current row in the same round trip. `Turns` lets one update per session key
at a time run in this process, so two updates of a busy chat wait for each other here instead of
conflicting in the database. `Contended` remembers the keys whose optimistic write lost a race
lately (their updates take the lock straight away for a while), and, a second one, those whose memory
went stale (read afresh for a while).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass

from . import StoredSession

__all__ = ["TURN_STUCK_AFTER", "Cached", "Contended", "SessionCache", "Turns"]


@dataclass(slots=True)
class Cached:
    """Not changed once made, but not a frozen dataclass: building one of those costs several times as
    much (each field set through object.__setattr__), and one is built for every session written."""

    # Both None: there was no row (a new chat; a user's lazy session read and left at its initial value).
    session: StoredSession | None
    revision: str | None  # the row's version when it held `session`: "<server start time>:<xmin>"
    since: float  # time.monotonic() when remembered
    refreshed: bool = False  # learnt from a refused statement: another process wrote the key just now


class SessionCache:
    """The last `size` sessions used, least recently used forgotten first; none older than `max_age`.

    Only sessions without an expiry are kept (an expired one must read as missing), and keys with no row
    at all: a user's lazy session that stays at its initial value is never written, and without that
    memory each of the user's updates read it again, a round trip a bot with one session does not take.
    The age limit keeps a remembered `xmin` far from the 2**32 transactions after which PostgreSQL could
    reuse it.

    It also keeps which keys this process wrote lately (`wrote`, `written_since`), whatever their
    expiry and whatever `size`: a row read before its key's turn (read ahead, for a lazy session) is
    used only if no update of this process wrote it since, which the turns otherwise rule out. The last
    `WRITES` writes are kept; asked about an earlier point, it answers yes (read the row again).
    """

    WRITES = 1000

    def __init__(self, size: int, max_age: float = 3600.0) -> None:
        self.size = size
        self.max_age = max_age
        self._entries: dict[str, Cached] = {}
        self.clock = 0  # writes so far (`wrote`)
        self._written: dict[str, int] = {}  # key -> the clock after its last write, oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Cached | None:
        entry = self._entries.pop(key, None)
        if entry is None or time.monotonic() - entry.since > self.max_age:
            return None
        self._entries[key] = entry  # now the most recently used: dicts keep insertion order
        return entry

    def put(
        self, key: str, session: StoredSession | None, revision: str | None, *, refreshed: bool = False
    ) -> None:
        """Remember `key` as `session` at `revision`; both None: there is no row."""
        if self.size <= 0:
            return
        self._entries.pop(key, None)
        self._entries[key] = Cached(session, revision, time.monotonic(), refreshed)
        if len(self._entries) > self.size:
            del self._entries[next(iter(self._entries))]

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    def wrote(self, key: str, session: StoredSession | None = None, revision: str | None = None) -> None:
        """An update of this process wrote `key` (or is writing it with locks): what is remembered of
        it is stale, and a row of it read ahead before now is too. Given the `session` written and the
        row's `revision` after the write, that is remembered instead."""
        if session is not None and revision is not None:
            self.put(key, session, revision)
        else:
            self.forget(key)
        self.clock += 1
        written = self._written
        written.pop(key, None)
        written[key] = self.clock
        if len(written) > self.WRITES:
            # The oldest key's last write is at least WRITES writes back: `written_since` answers yes
            # for any point that far back without it.
            del written[next(iter(written))]

    def written_since(self, key: str, clock: int) -> bool:
        """Whether this process wrote `key` after `clock` (an earlier `self.clock`), or may have."""
        return self.clock - clock >= self.WRITES or self._written.get(key, 0) > clock


# How long a session key's turn may be held before the key's later updates stop waiting for it:
# Telegram's own 60 s, past REQUEST_DEADLINE (at most 55 s; a dead letter is recorded after the turn is
# given back). An update holds one longer only if it ignored its cancellation (a handler that swallowed
# it); a timer's fire has no deadline, and one doing long work may hold one longer too: the key's updates
# then run with locks rather than wait for it (an optimistic fire refused at its commit runs again).
TURN_STUCK_AFTER = 60.0


class Turns:
    """Up to `holders` holders per key at a time (one by default), the others waiting in arrival order; no
    state kept for a free key.

    A key whose every turn has been held `stuck_after` seconds is stuck: its holders outlived any
    deadline. Nobody should queue behind it then, or its key's updates in this process would all wait
    for them for as long as they run; and those already queued stop waiting when it becomes stuck
    (`take` answers False), rather than each waiting out its own deadline for one more 503. One timer per
    key with waiters does it (`_watch`), armed for when its latest holder would be stuck."""

    def __init__(self, stuck_after: float = TURN_STUCK_AFTER, holders: int = 1) -> None:
        self.stuck_after = stuck_after
        self.holders = holders
        self._waiting: dict[str, deque[asyncio.Future[bool]]] = {}  # present while the key is held
        self._held: dict[str, int] = {}  # key -> how many hold it
        # key -> when its latest holder got its turn (monotonic): with every turn taken, every holder has
        # held its own at least that long.
        self._since: dict[str, float] = {}
        self._watches: dict[str, asyncio.TimerHandle] = {}  # key -> its `_watch`, once it had waiters

    def busy(self, key: str) -> bool:
        return key in self._waiting

    def take_free(self, key: str) -> bool:
        """Take one of the key's turns if one is free (True), without waiting; False when all are taken."""
        queue = self._waiting.get(key)
        if queue is None:
            self._waiting[key] = deque()
            self._held[key] = 1
        elif queue or self._held[key] >= self.holders:
            return False
        else:
            self._held[key] += 1
        self._since[key] = time.monotonic()
        return True

    def stuck(self, key: str) -> bool:
        """Whether every turn of the key has been held for `stuck_after` seconds."""
        since = self._since.get(key)
        return (
            since is not None
            and self._held[key] >= self.holders
            and time.monotonic() - since >= self.stuck_after
        )

    async def take(self, key: str) -> bool:
        """Take one of the key's turns, waiting for it: True once taken, False if the key became stuck
        while this waited (nothing taken, nothing to give back)."""
        if self.take_free(key):
            return True
        turn: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        queue = self._waiting[key]
        queue.append(turn)
        if key not in self._watches:
            self._arm(key)
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.result():
                self.give_back(key)  # handed the turn as it was cancelled: the next in line gets it
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(turn)
            raise

    def give_back(self, key: str) -> None:
        queue = self._waiting[key]
        while queue:
            turn = queue.popleft()
            if not turn.done():
                turn.set_result(True)  # the turn goes to the next in line: as many hold the key
                self._since[key] = time.monotonic()
                return
        if self._held[key] > 1:
            self._held[key] -= 1
            return
        del self._waiting[key]
        del self._held[key]
        del self._since[key]

    def _watch(self, key: str) -> None:
        """Armed when the key's latest holder would be stuck: then its waiters are let go (False), else
        it waits for the holder of the time. Left to fire once the key is free (not cancelled in
        `give_back`, on every update's path): it finds no waiter then, and ends."""
        del self._watches[key]
        queue = self._waiting.get(key)
        if not queue:
            return
        if self.stuck(key):
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(False)
        else:  # handed on since (waiters queue only while every turn is held), or fired a little early
            self._arm(key)

    def _arm(self, key: str) -> None:
        """`_watch` the key when its latest holder would be stuck: timed on this class's clock,
        time.monotonic(), not the loop's (uvloop's counts whole milliseconds, and fires a little early)."""
        wait = self._since[key] + self.stuck_after - time.monotonic()
        self._watches[key] = asyncio.get_running_loop().call_later(max(wait, 0.001), self._watch, key)


class Contended:
    """Keys other processes were writing lately, each for `seconds` after it was added. The storage keeps
    two: keys whose optimistic write lost a race, run with locks for a while (a hot chat would otherwise
    run most of its updates twice, optimistically, then with the lock), and keys whose memory went stale,
    read afresh for a while (a chat served by several processes would otherwise have its memory refused,
    and its handlers run twice, on most updates)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        # key -> until when (monotonic). Empty nearly always, so a caller on every update's path asks
        # `contended.until and key in contended`: no call then.
        self.until: dict[str, float] = {}

    def add(self, key: str) -> None:
        now = time.monotonic()
        if len(self.until) > 1000:
            self.until = {k: t for k, t in self.until.items() if t > now}
        self.until[key] = now + self.seconds

    def __contains__(self, key: str) -> bool:
        until = self.until.get(key)
        return until is not None and until > time.monotonic()
