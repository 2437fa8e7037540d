"""The HTTP server against hostile clients, with a real `serve` process on loopback.

Each attack is bounded: a fixed number of bytes, a fixed number of slow bytes, a socket timeout that only
guards against a hang. Nothing here asserts how long something took.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest

from bot.app import SECRET_HEADER
from bot.apps.pizza_testing import PIZZA, hunger
from bot.server import MAX_HEAD_BYTES, MAX_HEADERS
from bot.testing.env import SECRET
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import BotProcess
from bot.testing.updates import encode, message_update

pytestmark = pytest.mark.slow

ServeBot = Callable[..., BotProcess]
HANG_GUARD = 30.0  # seconds; only so that a broken server fails the test instead of hanging it


@contextmanager
def connect(bot: BotProcess) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", bot.port), timeout=HANG_GUARD)
    try:
        yield sock
    finally:
        sock.close()


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def trickle(sock: socket.socket, data: bytes) -> None:
    """Send `data` one byte every 0.1 s, stopping as soon as the server has answered."""
    for byte in data:
        if answered(sock):
            return
        sock.sendall(bytes([byte]))
        threading.Event().wait(0.1)


def rss_kib(bot: BotProcess) -> int:
    status = Path(f"/proc/{bot.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def still_counts(bot: BotProcess, fake: FakeTelegram, chat_id: int) -> None:
    """The bot serves as before: a 🍕 is counted and /hunger answered."""
    headers = {SECRET_HEADER: SECRET, "content-type": "application/json"}
    for update in (message_update(1, chat_id, PIZZA), hunger(2, chat_id)):
        response = httpx.post(
            bot.url + "/webhook", content=encode(update), headers=headers, timeout=HANG_GUARD
        )
        assert response.status_code == 200
    fake.wait_for(lambda: len(fake.delivered_messages(chat_id)) == 1, timeout=HANG_GUARD)
    assert fake.delivered_messages(chat_id)[0]["text"] == "Your hunger level is 1!"


HEAD = b"POST /webhook HTTP/1.1\r\nHost: bot\r\nContent-Type: application/json\r\n"


def test_an_endless_header_is_cut_off_with_431_and_memory_stays_flat(
    serve_bot: ServeBot, fake: FakeTelegram
) -> None:
    bot = serve_bot()
    before = rss_kib(bot)
    # The attack, bounded: up to 64 MiB of one header value. Unguarded, httptools buffered all
    # of it; now the server answers once the head passes 16 KiB and stops reading.
    sent, chunk = 0, b"a" * 65536
    with connect(bot) as sock:
        sock.sendall(HEAD + b"X-Flood: ")
        try:
            while sent < 64 * 1024 * 1024 and not answered(sock):
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = answer(sock)
    grown = rss_kib(bot) - before
    print(f"\nheader flood: sent {sent // 1024} KiB before the server stopped reading; RSS grew {grown} KiB")
    assert sent < 64 * 1024 * 1024, "the server kept reading an endless header"
    # The answer can be lost to the reset that closing with unread data causes; then the close is it.
    assert reply == b"" or reply.startswith(b"HTTP/1.1 431 ")
    assert grown < 32 * 1024
    still_counts(bot, fake, -501)


@pytest.mark.parametrize(
    ("headers", "complaint"),
    [
        (b"X-Big: " + b"b" * MAX_HEAD_BYTES + b"\r\n", (b"request headers over",)),
        (b"".join(b"h%d: v\r\n" % n for n in range(MAX_HEADERS + 1)), (b"more than 100 request headers",)),
        # The 10,000 (90 KB): refused for their number when the head arrives in one read, for
        # its size when the kernel splits it (the guard stops reading at 16 KiB); both are right.
        (
            b"".join(b"h%d: v\r\n" % n for n in range(10_000)),
            (b"more than 100", b"request headers over"),
        ),
    ],
    ids=["one-big-header", "101-headers", "10000-headers"],
)
def test_too_big_or_too_many_headers_get_431(
    serve_bot: ServeBot, fake: FakeTelegram, headers: bytes, complaint: tuple[bytes, ...]
) -> None:
    bot = serve_bot()
    with connect(bot) as sock:
        sock.sendall(
            HEAD + f"{SECRET_HEADER}: {SECRET}\r\n".encode() + headers + b"Content-Length: 2\r\n\r\n{}"
        )
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert any(reason in reply for reason in complaint), reply
    still_counts(bot, fake, -502)


def test_a_connection_that_sends_nothing_is_closed(serve_bot: ServeBot) -> None:
    bot = serve_bot(HTTP_READ_TIMEOUT="1")
    with connect(bot) as sock:
        assert answer(sock) == b""  # closed by the server, without a word (the guard raises on a hang)


@pytest.mark.parametrize("after_a_request", [False, True], ids=["first-request", "keep-alive"])
def test_headers_sent_a_byte_at_a_time_get_408(serve_bot: ServeBot, after_a_request: bool) -> None:
    bot = serve_bot(HTTP_READ_TIMEOUT="1")
    with connect(bot) as sock:
        if after_a_request:  # the next request on a kept-alive connection gets the same deadline
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bot\r\n\r\n")
            served = b""
            while not served.endswith(b"\r\n\r\nok"):
                served += sock.recv(4096)
        trickle(sock, HEAD)  # 68 bytes, one every 0.1 s: longer than the deadline
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert b"request headers not received within 1 s" in reply


def test_a_body_sent_too_slowly_gets_408_and_changes_nothing(serve_bot: ServeBot, database_url: str) -> None:
    bot = serve_bot(HTTP_READ_TIMEOUT="1")
    body = encode(message_update(1, -503, PIZZA))
    with connect(bot) as sock:
        sock.sendall(HEAD + f"{SECRET_HEADER}: {SECRET}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        trickle(sock, body[:50])
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert b"request body not received within 1 s" in reply
    assert "Traceback" not in bot.output()
    assert _rows(database_url) == 0


def test_connections_past_the_cap_get_503_until_others_close(serve_bot: ServeBot, fake: FakeTelegram) -> None:
    bot = serve_bot(HTTP_MAX_CONNECTIONS="3", HTTP_READ_TIMEOUT="20")
    idle = [socket.create_connection(("127.0.0.1", bot.port), timeout=HANG_GUARD) for _ in range(3)]
    try:
        with connect(bot) as sock:
            assert answer(sock).startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in idle:
            sock.close()
    # The server notices the closes as soon as it reads them; until then, a retry may still meet the cap.
    for _ in range(100):
        try:
            if httpx.get(bot.url + "/healthz", timeout=HANG_GUARD).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        threading.Event().wait(0.05)
    still_counts(bot, fake, -504)


def test_sigterm_answers_a_body_still_arriving_with_503_at_once(
    serve_bot: ServeBot, database_url: str
) -> None:
    # A read deadline and a grace period far longer than the test: only the shutdown can answer it.
    bot = serve_bot(HTTP_READ_TIMEOUT="60", SHUTDOWN_TIMEOUT="60")
    body = encode(message_update(1, -505, PIZZA))
    with connect(bot) as sock:
        sock.sendall(HEAD + f"{SECRET_HEADER}: {SECRET}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        sock.sendall(body[:10])
        threading.Event().wait(0.3)  # the request is inside the app, waiting for the rest of its body
        assert bot.terminate(timeout=HANG_GUARD) == 0
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 503 ")  # Telegram delivers it again
    assert "Traceback" not in bot.output()
    assert _rows(database_url) == 0


def _rows(database_url: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            total: int = await conn.fetchval(
                "SELECT (SELECT count(*) FROM processed_updates) + (SELECT count(*) FROM outbox)"
            )
            return total
        finally:
            await conn.close()

    import asyncio

    return asyncio.run(count())
