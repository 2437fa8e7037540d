"""Broken answers the fake Bot API can give instead of carrying out a call (`FakeTelegram.misbehave_next`):
what the real Bot API, or a proxy in front of it, has been seen to send, or could."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Literal, get_args

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

__all__ = ["MISBEHAVIOURS", "Misbehaviour", "misbehave", "trickle"]

# Each is given instead of carrying out the call: the call did not take effect.
Misbehaviour = Literal[
    "invalid_utf8",
    "truncated_json",
    "deep_nesting",
    "html_page",
    "ok_false_200",
    "huge",
    "no_body",
    "reset",
    "trickle",
]
MISBEHAVIOURS: tuple[Misbehaviour, ...] = get_args(Misbehaviour)
HUGE_ANSWER_BYTES = 17 * 1024 * 1024  # past the client's 16 MiB limit
# A trickling answer: its headers at once, then its body a byte every `FakeTelegram.trickle_interval`
# seconds, padded to last this long: each read is quick, so only a total deadline ends it.
TRICKLE_BYTES = 3600


class _ResetMidBody(Response):
    """Promises 1000 bytes, sends a few, then drops the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"1000")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"ok": true, "res', "more_body": True})
        raise ConnectionResetError("the fake Bot API drops the connection mid-body (on purpose)")


def trickle(interval: float, done: Callable[[], None]) -> StreamingResponse:
    """Headers at once, then the body a byte every `interval` seconds, padded to last TRICKLE_BYTES such
    intervals; `done` is called when it ends (answered, or the client hung up)."""
    return StreamingResponse(_trickle(interval, done), media_type="application/json")


async def _trickle(interval: float, done: Callable[[], None]) -> AsyncIterator[bytes]:
    try:
        # JSON allows whitespace before the value: the answer stays valid however much of it is padding.
        for byte in b" " * TRICKLE_BYTES + b'{"ok": true, "result": true}':
            yield bytes([byte])
            await asyncio.sleep(interval)
    finally:
        done()  # answered, or the client hung up


async def _huge_answer() -> AsyncIterator[bytes]:
    yield b'{"ok": true, "result": "'
    chunk = b"a" * (1024 * 1024)
    for _ in range(HUGE_ANSWER_BYTES // len(chunk)):
        yield chunk
    yield b'"}'


def misbehave(kind: Misbehaviour) -> Response:
    """The broken answer `kind` (all but "trickle", which needs to know when it ends: `trickle()`)."""
    if kind == "invalid_utf8":
        return Response(b'{"ok": true, "result": {"text": "\xc3\x28"}}', media_type="application/json")
    if kind == "truncated_json":
        return Response(b'{"ok": true, "result": {"message_id": 1, "te', media_type="application/json")
    if kind == "deep_nesting":
        depth = 100_000
        return Response(b'{"ok": true, "result": ' + b"[" * depth + b"]" * depth + b"}")
    if kind == "html_page":
        return Response(b"<html><body><h1>502 Bad Gateway</h1></body></html>", 502, media_type="text/html")
    if kind == "ok_false_200":
        return Response(b'{"ok": false, "description": "Internal error"}', media_type="application/json")
    if kind == "huge":
        return StreamingResponse(_huge_answer(), media_type="application/json")
    if kind == "no_body":
        return Response(b"", 200)
    return _ResetMidBody()
