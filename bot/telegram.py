"""Telegram Bot API: decoding a webhook's update, and an async client for its methods.

The types are `bot.types`, generated from the Bot API. Decoding validates the shape (an `update_id` that is
a string is a 400, not a crash deep in a handler); fields newer than our Bot API version are skipped by the
types and kept in the update's raw body (`Update.raw`), so Telegram can add fields freely.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import mimetypes
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import msgspec
import msgspec.inspect

from .errors import BotError
from .files import Upload
from .limits import TooLarge, read_at_most

# The types lived here before they were generated: these names stay importable from here, so code
# written against the old slice (and branches begun before the move) keeps working. New code imports
# them from bot.types.
from .types import (
    UPDATE_KINDS,
    CallbackQuery,
    Chat,
    ChatMember,
    ChatMemberUpdated,
    Int64,
    Message,
    MessageEntity,
    MessageReactionUpdated,
    ReactionType,
    Update,
    User,
)

__all__ = [
    "UPDATE_KINDS",
    "BotApi",
    "BotApiError",
    "CallbackQuery",
    "Chat",
    "ChatMember",
    "ChatMemberUpdated",
    "InvalidUpdate",
    "Message",
    "MessageEntity",
    "MessageReactionUpdated",
    "ReactionType",
    "Update",
    "User",
    "decode_update",
]


class InvalidUpdate(BotError, ValueError):
    """The body is not JSON, or not a Telegram Update object."""


_update_decoder = msgspec.json.Decoder(Update)

log = logging.getLogger("bot.telegram")


def decode_update(body: bytes) -> Update:
    """Decode one webhook body into an Update, or raise InvalidUpdate saying what is wrong."""
    try:
        try:
            update: Update = _update_decoder.decode(body)
        except msgspec.ValidationError as exc:
            update = _without_newer_members(body, exc)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec reports invalid UTF-8 inside a string as UnicodeDecodeError, not DecodeError.
        raise InvalidUpdate(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidUpdate("body is nested too deeply to be a Telegram Update") from None
    update.keep_raw(body)
    return update


# A union member to leave out (`_known`).
_NEWER = object()


def _without_newer_members(body: bytes, error: msgspec.ValidationError) -> Update:
    """The update, typed without the members of its unions that a later Bot API added (a reaction, a
    message origin, a paid medium of a new type): left out as if absent where the field is optional,
    dropped from a list, and where a required field holds one, the object holding it is left out in
    turn. Telegram adds them as it adds fields, and refusing the update (400) would fail every delivery
    of it, holding up its chat while Telegram redelivers. The raw body keeps them, and each tag is logged
    once per process and place (`_warn_newer`). Anything else that does not fit is not an Update:
    InvalidUpdate, with the first error found."""
    newer: list[tuple[str, str]] = []
    known = _known(msgspec.json.decode(body), _update_type(), "", newer)
    try:
        update: Update = _update_decoder.decode(msgspec.json.encode(known))
    except msgspec.ValidationError:
        raise InvalidUpdate(f"not a Telegram Update: {error}") from None
    _warn_newer(newer)  # (only for an update: a body that is none says nothing of our types)
    return update


# (where, tag) pairs already logged: one line each per process, however many updates carry them. At most
# _MAX_WARNED, so that made-up tags (from whoever holds the secret) cannot make it grow without end.
_warned: set[tuple[str, str]] = set()
_MAX_WARNED = 1000


def _warn_newer(newer: list[tuple[str, str]]) -> None:
    """Tell the operator our Bot API types are older than Telegram's: the tag and where it was, nothing
    of the update itself (a user's text, ids)."""
    for where, tag in newer:
        key = (where, tag[:64])
        if key in _warned or len(_warned) >= _MAX_WARNED:
            continue
        _warned.add(key)
        log.warning(
            "Telegram sent a union member newer than our Bot API types, type %r in %s: left out of the"
            " typed update (Update.raw keeps it); bot/_gen/README.md says how to upgrade the types",
            key[1],
            where,
        )


@functools.cache
def _update_type() -> msgspec.inspect.Type:
    return msgspec.inspect.type_info(Update)  # (~20 ms: made once, when first needed)


def _known(value: Any, kind: msgspec.inspect.Type, where: str, newer: list[tuple[str, str]]) -> Any:
    """`value` (decoded JSON) without the union members whose tag `kind` does not know, or _NEWER when it
    is one; each one left out is added to `newer`, with `where` it was (its fields' names from the
    update down, `[]` for a list's item). What does not fit otherwise is left as it is, for the decoder
    to refuse."""
    if isinstance(kind, msgspec.inspect.UnionType):
        # The member the value's JSON type can only be; for an object of a tagged union, by its tag.
        if isinstance(value, dict):
            structs = [t for t in kind.types if isinstance(t, msgspec.inspect.StructType)]
            tag_field = structs[0].tag_field if structs else None
            if tag_field is not None and isinstance(value.get(tag_field), str):
                member = next((t for t in structs if t.tag == value[tag_field]), None)
                if member is None:
                    newer.append((where, value[tag_field]))
                    return _NEWER
                return _known(value, member, where, newer)
            return _known(value, structs[0], where, newer) if len(structs) == 1 else value
        lists = [t for t in kind.types if isinstance(t, msgspec.inspect.ListType)]
        return _known(value, lists[0], where, newer) if isinstance(value, list) and len(lists) == 1 else value
    if isinstance(kind, msgspec.inspect.StructType) and isinstance(value, dict):
        for field in kind.fields:
            name = field.encode_name
            if name in value:
                inner = _known(value[name], field.type, f"{where}.{name}" if where else name, newer)
                if inner is not _NEWER:
                    value[name] = inner
                elif field.required:
                    return _NEWER  # this object cannot be typed without it: left out in turn
                else:
                    del value[name]
        return value
    if isinstance(kind, msgspec.inspect.ListType) and isinstance(value, list):
        items = (_known(v, kind.item_type, f"{where}[]", newer) for v in value)
        return [item for item in items if item is not _NEWER]
    return value


class BotApiError(BotError):
    """A Bot API call failed: Telegram said `ok: false`, or no usable answer came back in time.

    Every way a call can fail ends here, so a sender only has to ask two questions: retry it or give
    up (`permanent`), and could the first attempt have reached Telegram anyway (`may_have_arrived`: the
    request was sent, and the answer was lost, late or unreadable, so a retry may double it). Two of
    Telegram's `parameters` come along: `retry_after` (a 429) and `migrate_to_chat_id` (a group that
    became a supergroup: the call goes to that chat instead).
    """

    def __init__(
        self,
        method: str,
        description: str,
        error_code: int | None = None,
        retry_after: float | None = None,
        *,
        may_have_arrived: bool = False,
        migrate_to_chat_id: int | None = None,
    ) -> None:
        code = f" ({error_code})" if error_code is not None else ""
        super().__init__(f"{method} failed{code}: {description}")
        self.method = method
        self.description = description
        self.error_code = error_code
        self.retry_after = retry_after
        self.may_have_arrived = may_have_arrived
        self.migrate_to_chat_id = migrate_to_chat_id

    @property
    def permanent(self) -> bool:
        """Retrying the same request cannot help: it is wrong (bad chat, bot blocked, bad parameters).
        A group that became a supergroup is such a 400 too: `migrate_to_chat_id` says where to send."""
        return self.error_code is not None and 400 <= self.error_code < 500 and self.error_code != 429


class _ResponseParameters(msgspec.Struct):
    retry_after: float | None = None
    migrate_to_chat_id: Int64 | None = None


class _ApiResponse(msgspec.Struct):
    ok: bool
    result: Any = None
    description: str = ""
    error_code: int | None = None
    parameters: _ResponseParameters = msgspec.field(default_factory=_ResponseParameters)


_response_decoder = msgspec.json.Decoder(_ApiResponse)

# getUpdates' 100 updates stay far below this; more is not the Bot API, and is not held in memory.
MAX_ANSWER_BYTES = 16 * 1024 * 1024

# httpcore's trace events that mean the request has started to go out (HTTP/1.1 or HTTP/2).
_SENDING = frozenset({"http11.send_request_headers.started", "http2.send_request_headers.started"})


class BotApi:
    """Calls `{api_root}/bot{token}/{method}` on one shared httpx client (connection reuse).

    Every call has one total deadline, `timeout` seconds (per call: `call(..., timeout=)`) for the
    connection, the request, the answer's headers and its whole body together. httpx's own timeouts
    bound each read, so an answer trickling in a byte at a time would never end without it.

    The client is owned by whoever created it (the app's lifespan), not by this object. `call` raises
    only BotApiError, whatever the network or the server does, a missed deadline included.
    """

    def __init__(
        self,
        token: str,
        client: httpx.AsyncClient,
        api_root: str = "https://api.telegram.org",
        *,
        timeout: float = 30.0,
    ) -> None:
        self._base = f"{api_root.rstrip('/')}/bot{token}/"
        self._files = f"{api_root.rstrip('/')}/file/bot{token}/"
        self._client = client
        self.timeout = timeout

    # A per-call deadline, as httpx's own `timeout=`: the callers' asyncio.timeout would raise
    # TimeoutError, not the BotApiError every caller handles.
    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        files: Sequence[Upload] = (),
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """Call `method` with `params` and return its `result`, within `timeout` seconds (default: the
        client's). The parameters go as JSON; with `files` (which they name as "attach://<name>"), as
        multipart/form-data, each parameter a field (a str as it is, anything else as JSON)."""
        if files:
            request: dict[str, Any] = {
                "data": {
                    k: v if isinstance(v, str) else msgspec.json.encode(v).decode()
                    for k, v in (params or {}).items()
                },
                "files": [(f.name, (f.filename, f.data, _media_type(f.filename))) for f in files],
            }
        else:
            request = {
                "content": msgspec.json.encode(params or {}),
                "headers": {"content-type": "application/json"},
            }
        body, status = await self._post(method, self._base + method, request, timeout, _read_answer)
        try:
            answer = _response_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as exc:
            # An HTML error page from a proxy, an empty body, invalid UTF-8, absurd nesting... msgspec
            # raises the last two as UnicodeDecodeError and RecursionError, not as DecodeError.
            what = "empty" if not body else f"{type(exc).__name__}: {str(exc)[:200]}"
            raise BotApiError(
                method, f"unreadable HTTP {status} answer ({what})", may_have_arrived=True
            ) from None
        if not answer.ok:
            raise BotApiError(
                method,
                answer.description or "no description",
                answer.error_code if answer.error_code is not None else status,
                answer.parameters.retry_after,
                migrate_to_chat_id=answer.parameters.migrate_to_chat_id,
            )
        return answer.result

    async def download(
        self,
        file_path: str,
        into: Path | IO[bytes],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> int:
        """Stream a file Telegram keeps (`getFile`'s `file_path`) from `{root}/file/bot{token}/{file_path}`
        into a path or a binary stream, within the same total deadline as a call; returns its size. A
        path is written only once the whole file arrived (a failed download leaves nothing there)."""
        what = f"download {file_path}"
        if not isinstance(into, Path):
            size, _ = await self._post(what, self._files + file_path, {}, timeout, _writing(into), "GET")
            return size
        part = into.with_name(into.name + ".part")
        try:
            with part.open("wb") as sink:
                size, _ = await self._post(what, self._files + file_path, {}, timeout, _writing(sink), "GET")
            part.replace(into)
        finally:
            part.unlink(missing_ok=True)
        return size

    async def _post(
        self,
        what: str,
        url: str,
        request: dict[str, Any],
        timeout: float | None,  # noqa: ASYNC109
        read: _Reader[_T],
        verb: str = "POST",
    ) -> tuple[_T, int]:
        """One request within the total deadline, its answer handed to `read`; every failure of the
        network or the server becomes BotApiError, saying whether the request may have arrived."""
        deadline = self.timeout if timeout is None else timeout
        events: list[str] = []

        async def trace(event: str, info: dict[str, Any]) -> None:
            events.append(event)

        try:
            async with asyncio.timeout(deadline):
                async with self._client.stream(verb, url, **request, extensions={"trace": trace}) as response:
                    return await read(what, response), response.status_code
        except TimeoutError:
            # Sent unless the trace shows it never got that far (a transport without traces, such as
            # the playground's, says nothing: then it may have been).
            sent = not events or not _SENDING.isdisjoint(events)
            raise BotApiError(what, f"no answer within {deadline:g} s", may_have_arrived=sent) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Never sent: a retry cannot double anything.
            raise BotApiError(what, f"no connection to the Bot API: {exc!r}") from exc
        # From here on the request went out: whatever happened to the answer, Telegram may have acted on it.
        except httpx.HTTPError as exc:
            # A read timeout, a reset, a truncated or malformed answer.
            raise BotApiError(what, f"no answer from the Bot API: {exc!r}", may_have_arrived=True) from exc
        except TooLarge:
            raise BotApiError(
                what, f"answer over {MAX_ANSWER_BYTES} bytes: not the Bot API", may_have_arrived=True
            ) from None

    async def get_me(self) -> User:
        return msgspec.convert(await self.call("getMe"), User)


_T = TypeVar("_T")
_Reader = Callable[[str, httpx.Response], Awaitable[_T]]


async def _read_answer(what: str, response: httpx.Response) -> bytes:
    return await read_at_most(response.aiter_bytes(), MAX_ANSWER_BYTES)


def _writing(sink: IO[bytes]) -> _Reader[int]:
    """A reader that streams a file's body into `sink`, chunk by chunk; a non-200 is the Bot API's error."""

    async def read(what: str, response: httpx.Response) -> int:
        if response.status_code != 200:
            answer = await read_at_most(response.aiter_bytes(), MAX_ANSWER_BYTES)
            try:
                described = _response_decoder.decode(answer).description
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
                described = ""
            raise BotApiError(what, described or f"HTTP {response.status_code}", response.status_code)
        size = 0
        async for chunk in response.aiter_bytes():
            sink.write(chunk)
            size += len(chunk)
        return size

    return read


def _media_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"
