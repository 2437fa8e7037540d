"""How `serve` runs the app: uvicorn's httptools protocol, with the limits it does not have.

On Docker or a VPS the port faces the internet, and Telegram's webhook needs no secret to connect. Left
alone, uvicorn's httptools protocol buffers a header until it ends (one endless header took a process
from 47 MB to 409 MB and a full core), accepts any number of headers, keeps a connection that never
sends a request forever, and gives a client all the time it likes for its headers and body. This
protocol adds, per connection:

- the request line and headers: at most MAX_HEAD_BYTES and MAX_HEADERS, else 431 and closed;
- a deadline (HTTP_READ_TIMEOUT) for the whole request, headers and body, from the connection or from
  the request's first bytes: else 408 and closed (a connection that sent nothing is just closed);
- at most HTTP_MAX_CONNECTIONS connections: past it, a new one gets 503 and is closed;
- on shutdown (SIGTERM), a request still sending its body gets 503 at once (Telegram delivers it
  again), instead of holding the shutdown for its whole grace period and ending in a 500.

Idle keep-alive connections are closed after KEEP_ALIVE_TIMEOUT by uvicorn itself. The request path
pays a few attribute checks (about 2 µs of CPU per request, measured); a timer is armed only for a
request that does not arrive in one piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import http
import logging
import os
import signal
import socket
import sys
from typing import Any, ClassVar, cast

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import Settings
from .errors import BotError

__all__ = ["KEEP_ALIVE_TIMEOUT", "MAX_HEADERS", "MAX_HEAD_BYTES", "GuardedHttpProtocol", "run"]

log = logging.getLogger("bot.server")

# Telegram's requests carry a dozen short headers; browsers and proxies stay far below these.
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
KEEP_ALIVE_TIMEOUT = 5.0

# The collector's first threshold while serving (`run`).
YOUNG_OBJECTS = 10_000


class _Refused(BotError):
    """Raised from a parser callback to stop parsing; uvicorn then calls send_400_response."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded heads, read deadlines and a connection cap.

    The limits are class attributes, so that uvicorn can create it as it creates its own protocols;
    `run()` makes a subclass with the configured ones.
    """

    read_timeout: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 1000

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0  # received in chunks that did not finish a head, while waiting for one
        self._chunk = 0  # size of the chunk being parsed
        self._ended = False  # a request ended in the chunk being parsed
        self._waiting_for_head = True
        self._begun = False  # a byte of the current request has arrived
        self._refusal: tuple[int, str] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            self._refuse(503, f"more than {self.max_connections} connections")
            return
        self._deadline = self.loop.call_later(self.read_timeout, self._overdue)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # --- the head: counted as it arrives, since httptools buffers an unfinished header itself ---

    def data_received(self, data: bytes) -> None:
        self._chunk, self._ended = len(data), False
        super().data_received(data)
        if self.transport.is_closing():
            return
        # Counted only when all of the chunk belongs to a head still unfinished: one that finished a
        # head was checked exactly by on_headers_complete, and one in which a request ended holds that
        # request (a body of any size) before the next head. That next head's first bytes are left
        # uncounted, at most one read; its exact size is still checked when it ends.
        if self._waiting_for_head and not self._ended:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"request headers over {MAX_HEAD_BYTES} bytes")
                return
        # The clock starts only for a request left incomplete by the chunk that began it: one that
        # arrives whole (Telegram's do) costs no timer at all.
        if self._begun and self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout, self._overdue)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._waiting_for_head = self._begun = True

    def on_headers_complete(self) -> None:
        # Checked once per request rather than per header: the exact size is summed only when the bytes
        # that brought this head could have held more than the limit.
        if len(self.headers) > MAX_HEADERS:
            self._refusal = (431, f"more than {MAX_HEADERS} request headers")
        elif self._head_bytes + self._chunk > MAX_HEAD_BYTES and (
            len(self.url) + sum(len(name) + len(value) for name, value in self.headers) > MAX_HEAD_BYTES
        ):
            self._refusal = (431, f"request headers over {MAX_HEAD_BYTES} bytes")
        if self._refusal is not None:
            raise _Refused  # parsing stops here; uvicorn answers through send_400_response
        self._waiting_for_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:
            self._refuse(*self._refusal)
        else:
            super().send_400_response(msg)

    def on_message_complete(self) -> None:
        self._disarm()
        self._ended = True
        self._waiting_for_head = True  # what comes next on this connection is the next request's head
        self._begun = False
        super().on_message_complete()

    # --- the deadline: from the connection, or from a request's first bytes, to the request's end ---

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _overdue(self) -> None:
        self._deadline = None
        if not self._waiting_for_head:
            self._abort_request(408, f"request body not received within {self.read_timeout:g} s")
        elif self._begun:
            self._refuse(408, f"request headers not received within {self.read_timeout:g} s")
        else:
            self.transport.close()  # never sent a byte of a request: nobody to answer

    def shutdown(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not cycle.response_started:
            # Still receiving its body: waiting for it would hold the shutdown for a request that is
            # not even here yet. Telegram delivers it again after the 503.
            self._abort_request(503, "shutting down")
        else:
            super().shutdown()

    # --- answers of our own ---

    def _abort_request(self, status: int, reason: str) -> None:
        """Answer the request being received ourselves, close, and tell the app its client left."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self.transport.close()
            return
        if cycle.response_started:
            log.info("closed a connection from %s: %s", _peer(self), reason)
            self.transport.close()
        else:
            self._refuse(status, reason)
        cycle.disconnected = True  # the app's receive() returns http.disconnect; its answer is dropped
        cycle.message_event.set()

    def _refuse(self, status: int, reason: str) -> None:
        self._disarm()
        log.info("answered %d to %s and closed the connection: %s", status, _peer(self), reason)
        body = reason.encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s"
            % (status, http.HTTPStatus(status).phrase.encode(), len(body), body)
        )
        self.transport.close()


def _peer(protocol: HttpToolsProtocol) -> str:
    return f"{protocol.client[0]}:{protocol.client[1]}" if protocol.client else "a client"


class _ProxyHeadersExceptWebhook:
    """uvicorn's ProxyHeadersMiddleware (X-Forwarded-For and -Proto from FORWARDED_ALLOW_IPS) for every
    path but POST /webhook, which reads neither the client's address nor the scheme: there it cost ~2%
    of an update's samples on workload T for nothing."""

    def __init__(self, app: ASGIApp, trusted_hosts: list[str] | str) -> None:
        self._app = app
        # (uvicorn types ASGI more narrowly than Starlette: the same callables.)
        self._proxied = cast(ASGIApp, ProxyHeadersMiddleware(cast(Any, app), trusted_hosts=trusted_hosts))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/webhook":
            await self._app(scope, receive, send)
        else:
            await self._proxied(scope, receive, send)


def run(app: ASGIApp, settings: Settings, host: str, port: int) -> None:
    """Serve `app` until SIGINT or SIGTERM, then stop gracefully within SHUTDOWN_TIMEOUT."""
    protocol = type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {"read_timeout": settings.http_read_timeout, "max_connections": settings.http_max_connections},
    )
    trusted = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")  # (uvicorn's own default)
    config = uvicorn.Config(
        _ProxyHeadersExceptWebhook(app, trusted),
        host=host,
        port=port,
        proxy_headers=False,  # (applied above, but for the webhook)
        http=protocol,
        ws="none",  # no WebSocket routes: an upgrade request is just another HTTP request
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's lines go through our handler, in our format (bot.logs)
        access_log=False,
        server_header=False,
        timeout_keep_alive=int(KEEP_ALIVE_TIMEOUT),
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
    )
    # Everything imported and built so far (modules, the app) lives as long as the process: moved out
    # of the collector's sight, a full collection no longer walks it all while requests wait (and forked
    # workers share it untouched). Workload T, single runs before and after: p99 38.5 → 20.7 to 27.1 ms,
    # CPU 151 → 119 to 136 µs per update, 5,413 → 6,204 to 6,914 updates/s. Here, not in the app's
    # start-up, so that tests serving the app in their own process keep a normal collector.
    gc.freeze()
    # A young-generation collection every 700 allocations (the default) walks what the requests in flight
    # hold, each time: ~450 collections per 10,000 updates on workload T, ~0.5 s of pauses (gc.callbacks
    # measured). Every YOUNG_OBJECTS instead: the same walk, a fourteenth as often. Cycles are rare on
    # the request path (reference counting frees the rest at once), so memory hardly grows.
    gc.set_threshold(YOUNG_OBJECTS, *gc.get_threshold()[1:])
    sockets = [config.bind_socket()]
    if settings.metrics_port is not None:
        # One server on two sockets: the app serves only /metrics on this one (bot.app).
        metrics = uvicorn.Config(app, host=host, port=settings.metrics_port, log_config=None)
        sockets.append(metrics.bind_socket())
    if settings.web_concurrency == 1:
        uvicorn.Server(config).run(sockets=sockets)
        return
    _run_workers(config, settings.web_concurrency, sockets)


def _end_with(parent: int) -> None:
    """Have the kernel SIGTERM this worker when the parent dies, even by SIGKILL (a platform stopping
    the process, a test killing it): otherwise orphaned workers would keep serving the port."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call above took effect
        os._exit(0)


def _run_workers(config: uvicorn.Config, workers: int, sockets: list[socket.socket]) -> None:
    """WEB_CONCURRENCY: fork that many servers sharing the bound sockets, and pass SIGTERM/SIGINT on.

    Forked, not spawned (uvicorn's own supervisor pickles its config, and this protocol class is made at
    run time): each worker opens its own pool and sweeper in the app's lifespan, after the fork. (With
    METRICS_PORT, each scrape reads the worker that accepted it.)
    """
    parent = os.getpid()
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve, then leave without running the parent's clean-up a second time
            try:
                _end_with(parent)
                uvicorn.Server(config).run(sockets=sockets)
            finally:
                logging.shutdown()  # the log lines still queued (bot.logs): os._exit skips atexit
                os._exit(0)
        children.append(pid)

    def forward(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        os.waitpid(child, 0)
    for sock in sockets:
        sock.close()
