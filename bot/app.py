"""The ASGI app: Telegram's webhook, health and readiness probes, metrics, and the local playground
(imported only when it is on: a production app never loads the local trial's code).

POST /webhook: secret → body (bounded) → decode → pipeline (claim, lock, handlers, commit) → 200, and
only then the replies go out. A fault that may pass (the database away or slow) answers 503, so Telegram
delivers the update again; one that would fail every delivery (a bug, a value that cannot be stored) is
committed as a dead letter and answered 200. Nothing is acknowledged before it is durable.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .config import Settings
from .dispatch import Bot
from .failures import TryLater
from .limits import TooLarge
from .metrics import CONTENT_TYPE
from .runtime import Runtime, start
from .storage import PendingCall, Storage, StorageUnavailable
from .telegram import InvalidUpdate, decode_update
from .webhook import SECRET_HEADER
from .webhook_watch import watching

__all__ = ["SECRET_HEADER", "create_app"]

log = logging.getLogger("bot.app")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message}, status_code=status)


_SECRET = SECRET_HEADER.lower().encode()


async def _read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit`: a huge upload is never held in memory. Raises
    ClientDisconnect when the client left (as Starlette's Request.stream does)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect  # http.disconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge
        parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


class _Webhook:
    """POST /webhook, as a plain ASGI app: every update passes here, and Starlette's Request, Headers and
    Response objects cost ~4% of a request's CPU for what is one header lookup, one body and, nearly
    always, an empty 200 (py-spy on workload T). Rare answers (errors, a reply in the response) still
    go through Starlette's responses.

    One per app, holding the app's runtime once its lifespan has started it: `app.state.runtime` goes
    through Starlette's State.__getattr__, which Python calls only after the plain lookup failed (an
    AttributeError made and dropped). Reading the attribute here instead took the process from 422,200
    to 418,100 instructions per update (bench/instructions.py)."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.runtime
        if runtime is None:  # (uvicorn serves nothing before the lifespan's start-up is done)
            raise RuntimeError("POST /webhook before the app started")
        response = await self.answer(runtime, scope, receive)
        if response is None:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
        else:
            await response(scope, receive, send)

    async def answer(self, runtime: Runtime, scope: Scope, receive: Receive) -> Response | None:
        """The response, or None for an empty 200."""
        settings = runtime.settings
        given, declared = b"", None
        for name, value in scope["headers"]:  # (lower-case names, as ASGI has them)
            if name == _SECRET:
                given = given or value
            elif name == b"content-length" and declared is None:
                declared = value
        if not hmac.compare_digest(given, settings.webhook_secret.encode()):
            return _error(401, f"wrong or missing {SECRET_HEADER}")
        try:
            body = await _read_body(receive, declared, settings.max_body_bytes)
        except TooLarge:
            return _error(413, f"body is over the limit of {settings.max_body_bytes} bytes")
        except ClientDisconnect:
            # The client left, or the server gave up on a body too slow or cut short by a shutdown and
            # answered it already (bot.server): nothing was read, nothing to do, nobody to answer.
            return Response(status_code=400)
        try:
            update = decode_update(body)
        except InvalidUpdate as exc:
            return _error(400, str(exc))
        try:
            # Applied, or recorded as a dead letter (a bug, a value that cannot be stored): 200 either way.
            outcome = await runtime.pipeline.process(update)
        except TryLater as exc:
            log.warning(
                "update %d not applied, answering 503 so Telegram redelivers it: %s", update.update_id, exc
            )
            return _error(503, "temporarily unavailable, deliver again later")
        # A call that uploads files cannot ride in a JSON answer: it is sent as multipart, after the commit.
        if settings.webhook_reply and outcome.to_send and not outcome.to_send[0].has_files:
            return await _reply_in_response(runtime, outcome.to_send)
        runtime.outbox.send_soon(outcome.to_send)
        return None


async def _reply_in_response(runtime: Runtime, calls: list[PendingCall]) -> Response | None:
    """Opt-in (WEBHOOK_REPLY): the first call rides in the 200's body, saving a round trip.

    Telegram gives no result for such a call, so it is marked sent on faith: if Telegram drops it (a bad
    parameter, a flood limit), the reply is lost. The default, sending after the commit, cannot lose one.
    """
    first, rest = calls[0], calls[1:]
    try:
        await runtime.storage.mark_sent(first.id)
    except StorageUnavailable:
        runtime.outbox.send_soon(calls)
        return None
    runtime.outbox.send_soon(rest)
    return JSONResponse({"method": first.method, **first.params})


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    try:
        async with asyncio.timeout(3):
            await runtime.storage.ping()
    except (StorageUnavailable, TimeoutError) as exc:
        # The probe is unauthenticated: driver errors name databases, users and addresses. They go to
        # the log, where the operator looks anyway.
        log.warning("readiness: database not ready: %s", exc or "no answer within 3 s")
        return _error(503, "database not ready")
    return PlainTextResponse("ready")


def _on_metrics_port(settings: Settings, scope: Scope) -> bool:
    server = scope.get("server")
    return settings.metrics_port is not None and server is not None and server[1] == settings.metrics_port


async def metrics(request: Request) -> Response:
    """Prometheus' text format, for METRICS_PORT or a METRICS_TOKEN bearer only: it tells whoever reads
    it how busy every part of the bot is. Neither configured: 404, as if there were no such page."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    if not _on_metrics_port(settings, request.scope):
        if settings.metrics_token is None:
            return _error(404, "Not Found")
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {settings.metrics_token}".encode()):
            return JSONResponse(
                {"ok": False, "error": "a METRICS_TOKEN bearer is required"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
    try:
        async with asyncio.timeout(3):
            status = await runtime.storage.outbox_status(time.time())
    except (StorageUnavailable, TimeoutError) as exc:
        log.warning("metrics: outbox status unavailable: %s", exc)
        status = None
    runtime.metrics.set_outbox_status(status)
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)


class _OnlyMetricsOnMetricsPort:
    """METRICS_PORT is for scrapers: nothing but /metrics is served on it."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self._app = app
        self._settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] != "/metrics"
            and _on_metrics_port(self._settings, scope)
        ):
            await PlainTextResponse("Not Found", status_code=404)(scope, receive, send)
        else:
            await self._app(scope, receive, send)


class _App(Starlette):
    """Starlette, with Telegram's POST /webhook taken straight to its endpoint.

    Every update passes here, and nothing on the way (the error and exception middlewares, the route
    table, the endpoint wrapper) does anything for it: the endpoint answers every case itself, and
    uvicorn answers 500 to anything that escapes. Skipping them saved ~10 µs of CPU per update
    (`bench/process_cpu.py`, three alternating runs: 227 to 233 µs per update against 237 to 243 µs).
    Everything else is routed as usual.
    """

    def __init__(self, settings: Settings, webhook: _Webhook, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._settings = settings
        self._webhook = webhook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == "/webhook"
            and scope["method"] == "POST"
            and not _on_metrics_port(self._settings, scope)
        ):
            await self._webhook(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def _no_playground(settings: Settings) -> list[BaseRoute]:
    """The playground is off: its page and API answer 404, saying why in one line."""
    why = "BOT_TOKEN is set and PLAYGROUND is not 1" if settings.bot_token else "PLAYGROUND is off"
    answer = PlainTextResponse(f"no playground here: {why}\n", status_code=404)

    async def not_here(request: Request) -> Response:
        return answer

    methods = ["GET", "HEAD", "POST"]
    return [
        Route("/", not_here, methods=methods),
        Route("/playground/{rest:path}", not_here, methods=methods),
    ]


def create_app(
    settings: Settings, *, bot: Bot[Any] | None = None, storage: Storage | None = None
) -> Starlette:
    playground_routes = _no_playground(settings)
    transport = None
    if settings.playground:
        from .playground import Playground  # the local trial's code, loaded only for it

        playground = Playground(settings)
        playground_routes, transport = playground.routes(), playground.bot_api_transport()

    webhook = _Webhook()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            start(settings, bot=bot, storage=storage, bot_api_transport=transport) as runtime,
            watching(settings, runtime.api, runtime.metrics.registry),
        ):
            app.state.runtime = webhook.runtime = runtime
            yield

    return _App(
        settings,
        webhook,
        routes=[
            Route("/webhook", webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *playground_routes,
        ],
        middleware=[Middleware(_OnlyMetricsOnMetricsPort, settings=settings)],
        lifespan=lifespan,
    )
