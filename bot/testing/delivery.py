"""Delivering updates the way Telegram does, for fault tests and benchmarks.

Telegram keeps sending an update until it gets a 2xx: after a non-2xx, a dropped connection or a
timeout it tries again (immediately, then with backoff). `deliver` does the same against our webhook,
with a bounded number of requests in flight and, optionally, at most one update per chat in flight
(Telegram's rule for a chat's messages).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import SplitResult, urlsplit

import httpx

from ..types import Update
from ..webhook import SECRET_HEADER
from .updates import encode

__all__ = ["DeliveryStats", "LoopbackHttp", "Poster", "deliver"]


class _Response(Protocol):
    @property
    def status_code(self) -> int: ...


class Poster(Protocol):
    """What `deliver` needs of an HTTP client: httpx.AsyncClient, or the leaner `LoopbackHttp`."""

    async def post(self, url: str, *, content: bytes, headers: dict[str, str]) -> _Response: ...


@dataclass(frozen=True)
class _Status:
    status_code: int


class LoopbackHttp:
    """A minimal keep-alive HTTP/1.1 client for benchmarks.

    httpx spends several times the CPU of the bot under test per request; on a 2-core machine that
    makes the load generator the bottleneck (of benchmarks, and of the fault tests' loads too). This one
    only writes a POST and reads the status line, headers and a Content-Length body, which is all our
    webhook answers with.
    """

    def __init__(self, timeout: float | None = None) -> None:
        """`timeout`: seconds for a whole request, connecting included, as httpx's client has one; past
        it the request fails like a dropped connection (a bot stuck on a request must not hang a test)."""
        self._timeout = timeout
        self._idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = (
            defaultdict(list)
        )

    async def open(self, url: str, count: int) -> None:
        """Open `count` keep-alive connections now: a benchmark's clock then starts with them open, as
        the raw asyncpg loop's starts with its pool open, and as Telegram's connections stay open."""
        address = self._address(urlsplit(url))
        for _ in range(count):
            self._idle[address].append(await asyncio.open_connection(*address))

    @staticmethod
    def _address(parts: SplitResult) -> tuple[str, int]:
        return (parts.hostname or "127.0.0.1", parts.port or 80)

    async def post(self, url: str, *, content: bytes, headers: dict[str, str]) -> _Status:
        parts = urlsplit(url)
        address = self._address(parts)
        idle = self._idle[address]
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = f"POST {parts.path} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-length: {len(content)}\r\n{head}\r\n"
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._timeout):
                # A refused connection (a process killed, not yet restarted) fails as httpx's would.
                reader, writer = idle.pop() if idle else await asyncio.open_connection(*address)
                writer.write(request.encode("latin-1") + content)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                status = int(status_line.split()[1])
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
            if writer is not None:
                writer.close()
            raise httpx.TransportError(f"connection failed: {exc!r}") from exc
        idle.append((reader, writer))
        return _Status(status)

    async def __aenter__(self) -> LoopbackHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for _, writer in connections:
                writer.close()
        self._idle.clear()


@dataclass
class DeliveryStats:
    delivered: int = 0
    attempts: int = 0
    redelivered: int = 0
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    latencies: list[float] = field(default_factory=list)  # seconds, of the attempts that got a 2xx
    elapsed: float = 0.0

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


def _chat_of(update: Update) -> int | None:
    """The chat whose messages take turns: callback queries and the like travel apart, as in Telegram."""
    message = update.message or update.channel_post or update.edited_message
    return None if message is None else message.chat.id


async def deliver(
    client: Poster,
    url: Callable[[], str],
    secret: str,
    updates: Sequence[Update],
    *,
    in_flight: int = 32,
    one_per_chat: bool = False,
    duplicate_share: float = 0.0,
    give_up_after: float = 120.0,
    seed: int = 0,
) -> DeliveryStats:
    """Deliver every update until it gets a 2xx.

    `url` is asked before every attempt, so a test can move the webhook to a restarted process.
    `duplicate_share` sends that share of updates a second time, concurrently with the first attempt,
    as Telegram does when a retry overlaps a slow first attempt.
    """
    stats = DeliveryStats()
    rng = random.Random(seed)
    gate = asyncio.Semaphore(in_flight)
    chat_locks: dict[int | None, asyncio.Lock] = defaultdict(asyncio.Lock)
    deadline = time.monotonic() + give_up_after
    headers = {SECRET_HEADER: secret, "content-type": "application/json"}

    async def attempt(body: bytes) -> bool:
        started = time.perf_counter()
        stats.attempts += 1
        try:
            response = await client.post(url(), content=body, headers=headers)
        except httpx.HTTPError:
            stats.statuses[0] += 1
            return False
        stats.statuses[response.status_code] += 1
        if 200 <= response.status_code < 300:
            stats.latencies.append(time.perf_counter() - started)
            return True
        return False

    async def until_delivered(body: bytes) -> None:
        delay = 0.05
        while not await attempt(body):
            stats.redelivered += 1
            if time.monotonic() > deadline:
                raise TimeoutError("an update was not accepted before give_up_after")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def one(update: Update) -> None:
        body = encode(update)
        # The chat's turn first, then a connection: a busy chat must not hold connections other
        # chats could use. asyncio.Lock is FIFO, so a chat's updates keep their order.
        lock = chat_locks[_chat_of(update)] if one_per_chat else None
        if lock is not None:
            await lock.acquire()
        try:
            async with gate:
                if rng.random() < duplicate_share:
                    await asyncio.gather(until_delivered(body), until_delivered(body))
                    stats.redelivered += 1
                else:
                    await until_delivered(body)
                stats.delivered += 1
        finally:
            if lock is not None:
                lock.release()

    started = time.perf_counter()
    await asyncio.gather(*(one(u) for u in updates))
    stats.elapsed = time.perf_counter() - started
    return stats
