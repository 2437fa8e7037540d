"""A fake Telegram Bot API server that speaks the real HTTP protocol, for tests and benchmarks.

`GET|POST /bot<token>/<method>` with parameters in the query string, a form, a JSON body or
multipart/form-data (uploads), answered `{"ok": true, "result": ...}` or `{"ok": false, "error_code": ...,
"description": ...}` like the real server. Every method of the Bot API is answered: a few as Telegram
would (sendMessage, getChatMember, setWebhook, getUpdates, getFile...), the rest with the smallest valid
result of their type (`results.py`). Every call is recorded with its files; an uploaded file gets a
file_id, `getFile` knows it and `GET /file/bot<token>/<file_path>` serves it. Failures, delays, broken or
trickling answers (`misbehave_next`) and groups that became supergroups (`migrated`) can be injected. `serve()` runs it with uvicorn in a
background thread, so it works from sync and async tests and for bot processes alike.

    python -m bot.testing.fake_telegram --port 8081     # for benchmarks and local trials
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import socket
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..files import Upload
from ..forms import BadForm, read_params
from ..types import Update
from .bad_answers import MISBEHAVIOURS, Misbehaviour, misbehave, trickle
from .results import RESULT_TYPES, ApiError, FileStore, MessageAnswers, as_int
from .updates import chat_member, user

__all__ = ["MISBEHAVIOURS", "FakeTelegram", "FloodLimits", "Misbehaviour", "RecordedCall", "serve"]

_TOKEN = re.compile(r"^(\d+):[A-Za-z0-9_-]+$")
_SECRET_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


@dataclass(frozen=True)
class RecordedCall:
    token: str
    method: str
    params: dict[str, Any]
    at: float
    # The uploads, by part name: the params name each "attach://<name>".
    files: dict[str, Upload] = field(default_factory=dict)


@dataclass
class _Failure:
    method: str
    times: int
    error_code: int
    description: str
    retry_after: int | None
    chat_id: int | None


@dataclass(frozen=True)
class FloodLimits:
    """Telegram's flood limits, enforced by the fake with a 429 (a sliding window per chat and one for
    the whole bot), so a test or a benchmark sees whether a sender keeps to them."""

    per_second: int = 30
    group_per_minute: int = 20
    private_per_second: int = 1
    retry_after: int = 5


class FakeTelegram(MessageAnswers):
    """State of the fake: recorded calls, the webhook, updates for getUpdates, injected failures."""

    def __init__(self, username: str = "test_bot", privacy: bool = False) -> None:
        self.username = username
        self.privacy = privacy
        self.delay = 0.0
        self.trickle_interval = 1.0
        self._lock = threading.Condition()
        self._calls: list[RecordedCall] = []
        self._failures: list[_Failure] = []
        # method -> (broken answer, the chat it is for or None for any), in order
        self._misbehaviours: dict[str, list[tuple[Misbehaviour, str | None]]] = {}
        self._delivered: list[dict[str, Any]] = []
        self._updates: list[dict[str, Any]] = []
        self._webhook: dict[str, Any] = {}
        self._webhook_error: tuple[int, str] | None = None
        self._message_ids = itertools.count(1)
        self._files = FileStore()
        self.admins: dict[int, set[int]] = {}  # chat id → user ids getChatMember calls administrators
        self.migrated: dict[int, int] = {}  # a group's chat id → the supergroup it became
        self._generation = 0  # bumped by reset(): ends long polls of a previous test's (dead) client
        # What the fake's "now" is, for RecordedCall.at and the flood limits: a test's fake clock, or time.
        self.clock: Callable[[], float] = time.time
        self.flood_limits: FloodLimits | None = None
        self._recent: dict[int | None, deque[float]] = defaultdict(deque)  # chat (None: all) -> send times
        self._delivered_calls: list[RecordedCall] = []
        self._open: Counter[str] = Counter()  # method -> requests being answered right now
        self._most_open: Counter[str] = Counter()
        self.app = Starlette(
            routes=[
                Route("/bot{token}/{method}", self._endpoint, methods=["GET", "POST"]),
                Route("/file/bot{token}/{file_path:path}", self._file, methods=["GET"]),
            ]
        )

    # --- what tests use ---

    def calls(self, method: str | None = None) -> list[RecordedCall]:
        with self._lock:
            return [c for c in self._calls if method is None or c.method == method]

    def sent_messages(self, chat_id: int | None = None) -> list[dict[str, Any]]:
        """sendMessage parameters, in the order they arrived (chat_id as a number)."""
        return [
            c.params
            for c in self.calls("sendMessage")
            if chat_id is None or c.params.get("chat_id") == chat_id
        ]

    def delivered_messages(self, chat_id: int | None = None) -> list[dict[str, Any]]:
        """Messages the fake actually sent to a chat (a call answered with a failure or a broken answer
        sent nothing), in order, as sendMessage's result."""
        with self._lock:
            return [m for m in self._delivered if chat_id is None or m["chat"]["id"] == chat_id]

    def delivered(self, chat_id: int | None = None) -> list[RecordedCall]:
        """The sendMessage calls that were answered ok (not failed, not refused by a flood limit)."""
        with self._lock:
            return [c for c in self._delivered_calls if chat_id is None or c.params.get("chat_id") == chat_id]

    def in_flight(self, method: str) -> int:
        """How many calls of `method` are being answered right now."""
        with self._lock:
            return self._open[method]

    def most_at_once(self, method: str) -> int:
        """The most calls of `method` that were being answered at the same time (a slow or trickling
        answer is being answered until its last byte, or until the client hangs up)."""
        with self._lock:
            return self._most_open[method]

    def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until `condition()` holds (checked on every call), or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the fake Bot API did not see what was waited for")
                self._lock.wait(min(left, 0.1))

    async def wait_for_async(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the fake Bot API did not see what was waited for")
            await asyncio.sleep(0.02)

    def fail_next(
        self,
        method: str,
        times: int = 1,
        error_code: int = 500,
        description: str = "Internal Server Error",
        retry_after: int | None = None,
        *,
        chat_id: int | None = None,
    ) -> None:
        """Answer the next `times` calls of `method` (to `chat_id` only, if given) with this error."""
        with self._lock:
            self._failures.append(_Failure(method, times, error_code, description, retry_after, chat_id))

    def misbehave_next(self, method: str, *kinds: Misbehaviour, chat_id: int | None = None) -> None:
        """Answer the next calls of `method` (to `chat_id` only, if given) with these broken answers, one
        per call, in order."""
        chat = None if chat_id is None else str(chat_id)
        with self._lock:
            self._misbehaviours.setdefault(method, []).extend((kind, chat) for kind in kinds)

    def push_update(self, update: Update | dict[str, Any]) -> None:
        """An update for getUpdates to hand out."""
        with self._lock:
            self._updates.append(update.json() if isinstance(update, Update) else update)
            self._lock.notify_all()

    def webhook_failed(self, message: str, at: float | None = None) -> None:
        """Report a failed delivery in getWebhookInfo, as Telegram does after one (`at`: unix time)."""
        with self._lock:
            self._webhook_error = (int(time.time() if at is None else at), message)

    @property
    def webhook(self) -> dict[str, Any]:
        """setWebhook's parameters as last accepted; empty when no webhook is set."""
        with self._lock:
            return dict(self._webhook)

    def reset(self) -> None:
        """Forget calls, failures, updates and the webhook, as for a new test."""
        with self._lock:
            self._calls.clear()
            self._failures.clear()
            self._misbehaviours.clear()
            self._delivered.clear()
            self._updates.clear()
            self._webhook = {}
            self._webhook_error = None
            self.delay = 0.0
            self.trickle_interval = 1.0
            self.admins = {}
            self.migrated = {}
            self._generation += 1
            self.clock = time.time
            self.flood_limits = None
            self._recent.clear()
            self._delivered_calls.clear()
            self._open.clear()
            self._most_open.clear()
            self._message_ids = itertools.count(1)
            self._files = FileStore()

    # --- the protocol ---

    async def _endpoint(self, request: Request) -> Response:
        token, method = request.path_params["token"], request.path_params["method"]
        try:
            params, files = await read_params(request)
        except BadForm as exc:
            return self._error(400, f"Bad Request: {exc}")
        match = _TOKEN.match(token)
        if match is None:
            return self._error(401, "Unauthorized")
        recorded = RecordedCall(token, method, params, self.clock(), files)
        with self._lock:
            self._calls.append(recorded)
            self._lock.notify_all()
            misbehaviour = self._next_misbehaviour(method, params)
            self._open[method] += 1
            self._most_open[method] = max(self._most_open[method], self._open[method])
        generation = self._generation

        def done() -> None:
            with self._lock:
                if generation == self._generation:  # not a call of a test that reset() forgot
                    self._open[method] -= 1

        if misbehaviour == "trickle":  # being answered until the trickle ends
            return trickle(self.trickle_interval, done)
        try:
            if misbehaviour is not None:
                return misbehave(misbehaviour)
            return await self._answer(int(match.group(1)), method, params, recorded)
        finally:
            done()

    async def _answer(
        self, bot_id: int, method: str, params: dict[str, Any], recorded: RecordedCall
    ) -> Response:
        if self.delay:
            await asyncio.sleep(self.delay)
        try:
            self._maybe_fail(method, params)
            handler = getattr(self, f"_m_{method}", None)
            if handler is not None:
                result = await handler(bot_id, params)
            elif method in RESULT_TYPES:
                result = self._any_method(bot_id, method, params, recorded.files)
            else:
                raise ApiError(404, "Not Found: method not found")
        except ApiError as exc:
            return self._error(exc.code, exc.description, exc.parameters)
        if method == "sendMessage":
            with self._lock:
                self._delivered_calls.append(recorded)
                self._lock.notify_all()
        return JSONResponse({"ok": True, "result": result})

    def _next_misbehaviour(self, method: str, params: dict[str, Any]) -> Misbehaviour | None:
        broken = self._misbehaviours.get(method, [])
        for n, (kind, chat) in enumerate(broken):
            if chat is None or chat == str(params.get("chat_id")):
                del broken[n]
                return kind
        return None

    def _maybe_fail(self, method: str, params: dict[str, Any]) -> None:
        with self._lock:
            for failure in self._failures:
                if (
                    failure.method == method
                    and failure.times > 0
                    and (failure.chat_id is None or str(failure.chat_id) == str(params.get("chat_id")))
                ):
                    failure.times -= 1
                    raise ApiError(failure.error_code, failure.description, retry_after=failure.retry_after)
            if method == "sendMessage" and self.flood_limits is not None:
                self._check_flood(self.flood_limits, params)

    def _check_flood(self, limits: FloodLimits, params: dict[str, Any]) -> None:
        """Refuse a send that would exceed a limit in its sliding window; count the ones let through."""
        now = self.clock()
        chat = int(params.get("chat_id", 0))
        private = chat > 0
        window = 1.0 if private else 60.0
        allowed = limits.private_per_second if private else limits.group_per_minute
        for key, span, most in ((None, 1.0, limits.per_second), (chat, window, allowed)):
            recent = self._recent[key]
            while recent and recent[0] <= now - span:
                recent.popleft()
            if len(recent) >= most:
                raise ApiError(
                    429,
                    f"Too Many Requests: retry after {limits.retry_after}",
                    retry_after=limits.retry_after,
                )
        self._recent[None].append(now)
        self._recent[chat].append(now)

    @staticmethod
    def _error(code: int, description: str, parameters: dict[str, int] | None = None) -> JSONResponse:
        body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
        if parameters:
            body["parameters"] = parameters
        return JSONResponse(body, status_code=code)

    async def _m_getMe(self, bot_id: int, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": bot_id,
            "is_bot": True,
            "first_name": "Test bot",
            "username": self.username,
            "can_join_groups": True,
            "can_read_all_group_messages": not self.privacy,
            "supports_inline_queries": False,
        }

    async def _m_sendMessage(self, bot_id: int, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = as_int(params, "chat_id")
        with self._lock:
            moved_to = self.migrated.get(chat_id)
        if moved_to is not None:
            # The real server's answer to a send to a group that became a supergroup.
            raise ApiError(
                400, "Bad Request: group chat was upgraded to a supergroup chat", migrate_to_chat_id=moved_to
            )
        if not params.get("text"):
            raise ApiError(400, "Bad Request: message text is empty")
        message = self._message(bot_id, params)
        with self._lock:
            self._delivered.append(message)
            self._lock.notify_all()
        return message

    async def _m_answerCallbackQuery(self, bot_id: int, params: dict[str, Any]) -> bool:
        if not params.get("callback_query_id"):
            raise ApiError(
                400, "Bad Request: query is too old and response timeout expired or query ID is invalid"
            )
        return True

    async def _m_getChatMember(self, bot_id: int, params: dict[str, Any]) -> dict[str, Any]:
        chat_id, user_id = as_int(params, "chat_id"), as_int(params, "user_id")
        with self._lock:
            admin = user_id in self.admins.get(chat_id, set())
        return chat_member("administrator" if admin else "member", user(user_id, "User"))

    async def _m_answerInlineQuery(self, bot_id: int, params: dict[str, Any]) -> bool:
        if not params.get("inline_query_id"):
            raise ApiError(
                400, "Bad Request: query is too old and response timeout expired or query ID is invalid"
            )
        if not isinstance(params.get("results"), list):
            raise ApiError(400, "Bad Request: can't parse inline query results: an array expected")
        return True

    async def _m_setWebhook(self, bot_id: int, params: dict[str, Any]) -> bool:
        # The checks the real server makes, with its words.
        url = str(params.get("url") or "")
        if not url:
            raise ApiError(400, "Bad Request: bad webhook: URL is empty")
        if not url.startswith("https://"):
            raise ApiError(400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
        if "secret_token" in params and not _SECRET_TOKEN.match(str(params["secret_token"])):
            raise ApiError(400, "Bad Request: secret token contains unallowed characters")
        if not 1 <= int(params.get("max_connections", 40)) <= 100:
            raise ApiError(400, "Bad Request: bad webhook: max_connections must be between 1 and 100")
        with self._lock:
            self._webhook = dict(params)
            if str(params.get("drop_pending_updates")).lower() == "true":
                self._updates.clear()
        return True

    async def _m_deleteWebhook(self, bot_id: int, params: dict[str, Any]) -> bool:
        with self._lock:
            self._webhook = {}
            if str(params.get("drop_pending_updates")).lower() == "true":
                self._updates.clear()
        return True

    async def _m_getWebhookInfo(self, bot_id: int, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            info: dict[str, Any] = {
                "url": self._webhook.get("url", ""),
                "has_custom_certificate": False,
                "pending_update_count": len(self._updates),
            }
            if self._webhook:
                info["max_connections"] = int(self._webhook.get("max_connections", 40))
                if "allowed_updates" in self._webhook:
                    info["allowed_updates"] = self._webhook["allowed_updates"]
            if self._webhook_error is not None:
                info["last_error_date"], info["last_error_message"] = self._webhook_error
        return info

    async def _m_getUpdates(self, bot_id: int, params: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            if self._webhook:
                raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active")
        offset = int(params.get("offset", 0))
        limit = int(params.get("limit", 100))
        allowed = params.get("allowed_updates")
        if isinstance(allowed, str):
            allowed = json.loads(allowed)
        deadline = time.monotonic() + float(params.get("timeout", 0))
        with self._lock:
            generation = self._generation
        while True:
            with self._lock:
                if generation != self._generation:
                    # Its client is gone with its test; confirming its offset would drop this test's updates.
                    return []
                if offset:
                    # As the real server: asking from `offset` confirms every update before it.
                    self._updates = [u for u in self._updates if u["update_id"] >= offset]
                if allowed:
                    # Kinds not asked for are never delivered (the real server does not even keep them).
                    self._updates = [u for u in self._updates if set(u) - {"update_id"} <= set(allowed)]
                if self._updates or time.monotonic() >= deadline:
                    return self._updates[:limit]
            await asyncio.sleep(0.02)


def _bound_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


@contextlib.contextmanager
def serve(fake: FakeTelegram, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the fake in a background thread; yield its root URL (use it as TELEGRAM_API_ROOT)."""
    sock = _bound_socket(host, port)  # bound here, so the port is known and can't be taken meanwhile
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake Bot API server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake Telegram Bot API server (for tests and benchmarks)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--username", default="test_bot")
    args = parser.parse_args()
    fake = FakeTelegram(username=args.username)
    print(f"fake Bot API at http://{args.host}:{args.port} (TELEGRAM_API_ROOT)", flush=True)
    uvicorn.run(fake.app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
