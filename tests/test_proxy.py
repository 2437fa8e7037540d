"""deploy/Caddyfile, run by a real Caddy (Debian's package; .ci/run installs it) in front of a real bot:
what the VPS setup exposes, and that its body limit is the bot's MAX_BODY_BYTES.

The site is served over plain HTTP here (`DOMAIN=http://…`): the certificate Caddy would obtain for a real
domain needs the internet. Everything after TLS is the file as deployed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bot.app import SECRET_HEADER
from bot.apps.pizza_testing import PIZZA, hunger
from bot.config import load_settings
from bot.testing.env import SECRET
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.processes import BotProcess, free_port
from bot.testing.updates import encode, message_update

pytestmark = pytest.mark.slow

CADDYFILE = Path(__file__).resolve().parent.parent / "deploy" / "Caddyfile"
METRICS_TOKEN = "scrape-token-0123456789"
MAX_BODY_BYTES = load_settings({}).max_body_bytes


@dataclass
class Proxied:
    url: str  # Caddy
    bot: BotProcess  # the bot behind it, reachable directly for comparison


@pytest.fixture
def proxied(serve_bot: Callable[..., BotProcess], tmp_path: Path) -> Iterator[Proxied]:
    caddy = shutil.which("caddy")
    if caddy is None:
        pytest.skip("caddy is not installed (apt-get install caddy; .ci/run installs it)")
    bot = serve_bot(METRICS_TOKEN=METRICS_TOKEN)
    port = free_port()
    env = {
        **os.environ,
        "DOMAIN": f"http://127.0.0.1:{port}",
        "BOT_UPSTREAM": f"127.0.0.1:{bot.port}",
        "CADDY_ADMIN": "off",  # several tests (and engineers) on one machine: no fixed admin port
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    with (tmp_path / "caddy.log").open("wb") as log:
        process = subprocess.Popen(
            [caddy, "run", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("caddy did not start:\n" + (tmp_path / "caddy.log").read_text()[-3000:])
                time.sleep(0.1)
        yield Proxied(url, bot)
    finally:
        process.terminate()
        process.wait(10)


def deliver(url: str, body: bytes) -> httpx.Response:
    headers = {SECRET_HEADER: SECRET, "content-type": "application/json"}
    return httpx.post(url + "/webhook", content=body, headers=headers, timeout=10)


def test_telegram_reaches_the_bot_through_the_proxy(proxied: Proxied, fake: FakeTelegram) -> None:
    assert deliver(proxied.url, encode(message_update(1, -7, PIZZA))).status_code == 200
    assert deliver(proxied.url, encode(hunger(2, -7))).status_code == 200
    fake.wait_for(lambda: len(fake.sent_messages(-7)) == 1, timeout=20)
    assert fake.sent_messages(-7)[0]["text"] == "Your hunger level is 1!"
    assert deliver(proxied.url, b"{}").status_code == 400  # the bot's own answers pass through


def test_only_the_webhook_and_the_health_checks_are_exposed(proxied: Proxied) -> None:
    for path in ("/healthz", "/readyz"):
        assert httpx.get(proxied.url + path).status_code == 200
    bearer = {"authorization": f"Bearer {METRICS_TOKEN}"}
    assert httpx.get(proxied.bot.url + "/metrics", headers=bearer).status_code == 200  # the bot serves it…
    assert httpx.get(proxied.url + "/metrics", headers=bearer).status_code == 404  # …the proxy does not
    assert httpx.get(proxied.url + "/").status_code == 404
    assert httpx.get(proxied.url + "/webhook").status_code == 404


def test_the_proxy_takes_a_body_up_to_max_body_bytes_and_refuses_a_larger_one_unread(
    proxied: Proxied, fake: FakeTelegram
) -> None:
    update = encode(message_update(3, -8, PIZZA))
    exactly = update + b" " * (MAX_BODY_BYTES - len(update))  # still one valid JSON document
    assert deliver(proxied.url, exactly).status_code == 200
    # One byte more, declared: refused by the proxy itself (an empty 413, not the bot's JSON one) before
    # the body is sent at all, as a client that waits for an answer would see it.
    host = proxied.url.removeprefix("http://")
    with socket.create_connection(("127.0.0.1", int(host.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(
            b"POST /webhook HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (host.encode(), MAX_BODY_BYTES + 1)
        )
        head = sock.recv(4096).split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 413 ")
    assert b"content-length: 0" in head and b"application/json" not in head
