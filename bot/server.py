"""How `serve` runs the app: uvicorn's httptools protocol, with the limits it does not have.

On Docker or a VPS the port faces the internet, and Telegram's webhook needs no secret to connect. Left
alone, uvicorn's httptools protocol buffers a header until it ends (one endless header took a process
from 47 MB to 409 MB and a full core), accepts any number of headers, keeps a connection that never
sends a request forever, and gives a client all the time it likes for its headers and body. This
protocol adds, per connection:

- the request line and headers: at most MAX_HEAD_BYTES and MAX_HEADERS, else 431 and closed;
- a deadline (HTTP_READ_TIMEOUT) for the headers, from the connection or the request's first byte,
  and another for the body, from the end of the headers: else 408 and closed (a connection that sent
  nothing is just closed);
- at most HTTP_MAX_CONNECTIONS connections: past it, a new one gets 503 and is closed;
- on shutdown (SIGTERM), a request still sending its body gets 503 at once (Telegram delivers it
  again), instead of holding the shutdown for its whole grace period and ending in a 500.

Idle keep-alive connections are closed after KEEP_ALIVE_TIMEOUT by uvicorn itself. The request path is
unchanged otherwise: a few counters and one timer per request.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Callable
from typing import ClassVar

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import Settings

__all__ = ["KEEP_ALIVE_TIMEOUT", "MAX_HEADERS", "MAX_HEAD_BYTES", "GuardedHttpProtocol", "run"]

log = logging.getLogger("bot.server")

# Telegram's requests carry a dozen short headers; browsers and proxies stay far below these.
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
KEEP_ALIVE_TIMEOUT = 5.0


class _Refused(Exception):
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
        self._head_bytes = 0  # received while waiting for a request's headers
        self._head_size = 0  # request line and headers of the request being parsed, exactly
        self._header_count = 0
        self._waiting_for_head = True
        self._heads_completed = 0
        self._refusal: tuple[int, str] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            self._refuse(503, f"more than {self.max_connections} connections")
            return
        self._arm(self._head_overdue)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # --- the head: counted as it arrives, since httptools buffers an unfinished header itself ---

    def data_received(self, data: bytes) -> None:
        waiting, completed = self._waiting_for_head, self._heads_completed
        super().data_received(data)
        if self.transport.is_closing():
            return
        # Only chunks that did not finish a head are all head: a chunk that did may carry a body.
        if waiting and self._waiting_for_head and completed == self._heads_completed:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"request headers over {MAX_HEAD_BYTES} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = self._header_count = 0
        self._waiting_for_head = True
        if self._deadline is None:  # a keep-alive connection's next request: its first byte starts the clock
            self._arm(self._head_overdue)

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value), 1)
        super().on_header(name, value)

    def _count_head(self, size: int, headers: int) -> None:
        self._head_size += size
        self._header_count += headers
        if self._head_size > MAX_HEAD_BYTES:
            self._refusal = (431, f"request headers over {MAX_HEAD_BYTES} bytes")
        elif self._header_count > MAX_HEADERS:
            self._refusal = (431, f"more than {MAX_HEADERS} request headers")
        if self._refusal is not None:
            raise _Refused  # the header is neither kept nor parsed further

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:
            self._refuse(*self._refusal)
        else:
            super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        self._waiting_for_head = False
        self._heads_completed += 1
        self._head_bytes = 0
        super().on_headers_complete()
        self._arm(self._body_overdue)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # --- deadlines ---

    def _arm(self, callback: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_overdue(self) -> None:
        self._deadline = None
        if self._head_bytes or self._head_size:
            self._refuse(408, f"request headers not received within {self.read_timeout:g} s")
        else:
            self.transport.close()  # never sent a byte: nobody to answer

    def _body_overdue(self) -> None:
        self._deadline = None
        self._abort_request(408, f"request body not received within {self.read_timeout:g} s")

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


def run(app: ASGIApp, settings: Settings, host: str, port: int) -> None:
    """Serve `app` until SIGINT or SIGTERM, then stop gracefully within SHUTDOWN_TIMEOUT."""
    protocol = type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {"read_timeout": settings.http_read_timeout, "max_connections": settings.http_max_connections},
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        log_level=settings.log_level.lower(),
        access_log=False,
        server_header=False,
        timeout_keep_alive=int(KEEP_ALIVE_TIMEOUT),
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
    )
    uvicorn.Server(config).run()
