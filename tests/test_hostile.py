"""Thousands of malformed or hostile requests at /webhook: never a 5xx, never a state change, never a hang."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.app import SECRET_HEADER
from bot.apps.pizza_testing import PIZZA
from bot.testing.env import SECRET, make_settings
from bot.testing.updates import encode, message_update
from bot.types import UPDATE_KINDS

pytestmark = pytest.mark.anyio

# Function-scoped fixtures are shared across examples on purpose: the point is that no example changes
# the database, so one database for all of them is what the final check looks at.
EXAMPLES = settings(
    max_examples=400,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
wrong_for_int = (
    st.text(max_size=5) | st.floats(allow_nan=False) | st.booleans() | st.none() | st.lists(st.integers())
)
huge_ints = st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1)


@st.composite
def broken_updates(draw: st.DrawFn) -> bytes:
    """A real-shaped pizza update with one thing made wrong: a field's type, a huge id, a missing field."""
    update = message_update(draw(st.integers(1, 2**31)), draw(st.integers(-(10**12), -1)), PIZZA).json()
    message = update["message"]
    damage = draw(
        st.sampled_from(["update_id", "chat_id", "text", "chat", "message", "drop_update_id", "huge"])
    )
    if damage == "update_id":
        update["update_id"] = draw(wrong_for_int)
    elif damage == "chat_id":
        message["chat"]["id"] = draw(wrong_for_int)
    elif damage == "text":
        message["text"] = draw(st.integers() | st.lists(st.text()) | st.dictionaries(st.text(), st.text()))
    elif damage == "chat":
        message["chat"] = draw(json_scalars | st.lists(json_scalars))
    elif damage == "message":
        # null is a legal "no message" (an update of another type); anything else is not a Message.
        update["message"] = draw(json_scalars.filter(lambda v: v is not None) | st.lists(json_scalars))
    elif damage == "drop_update_id":
        del update["update_id"]
    else:
        target = draw(st.sampled_from(["update_id", "chat", "migrate"]))
        number = draw(huge_ints)
        if target == "update_id":
            update["update_id"] = number
        elif target == "chat":
            message["chat"]["id"] = number
        else:
            message["migrate_to_chat_id"] = number
    return json.dumps(update).encode()


not_an_update = st.one_of(
    st.binary(max_size=300).filter(lambda b: b'"update_id"' not in b),
    json_values.map(lambda v: json.dumps(v).encode()).filter(lambda b: b'"update_id"' not in b),
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 3000).map(
        lambda depth: b'{"update_id": 1, "message": ' + b'{"a":' * depth + b"1" + b"}" * depth
    ),
    st.binary(min_size=1, max_size=50).map(
        lambda junk: b'{"update_id": 1, "message": {"text": "' + junk + b'"}}'
    ),
    broken_updates(),
)


@pytest.fixture
async def client(
    database_url: str,
    telegram_root: str,
    open_client: Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]],
) -> AsyncIterator[httpx.AsyncClient]:
    async with open_client(make_settings(database_url, telegram_root)) as c:
        yield c


@pytest.fixture
async def rows(database_url: str) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """`await rows()`: how many rows the bot's tables hold. One connection for all of a test's examples:
    opening one per example was a good part of each example's time."""
    conn = await asyncpg.connect(database_url)

    async def count() -> int:
        total: int = await conn.fetchval(
            "SELECT (SELECT count(*) FROM sessions) + (SELECT count(*) FROM processed_updates)"
            " + (SELECT count(*) FROM outbox)"
        )
        return total

    try:
        yield count
    finally:
        await conn.close()


@EXAMPLES
@given(body=not_an_update)
async def test_malformed_bodies_get_400_and_change_nothing(
    client: httpx.AsyncClient, rows: Callable[[], Awaitable[int]], body: bytes
) -> None:
    headers = {SECRET_HEADER: SECRET, "content-type": "application/json"}
    response = await client.post("/webhook", content=body, headers=headers, timeout=5)
    assert response.status_code == 400, (body[:200], response.text)
    assert await rows() == 0


@EXAMPLES
@given(
    secret=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=300).filter(
        lambda s: s != SECRET
    ),
    body=st.binary(max_size=200) | st.just(encode(message_update(1, -1, PIZZA))),
    content_type=st.sampled_from(["application/json", "text/plain", "", "multipart/form-data; boundary=x"]),
)
async def test_any_wrong_secret_gets_401_and_changes_nothing(
    client: httpx.AsyncClient, rows: Callable[[], Awaitable[int]], secret: str, body: bytes, content_type: str
) -> None:
    headers = {SECRET_HEADER: secret.encode("latin-1"), "content-type": content_type}
    response = await client.post("/webhook", content=body, headers=headers, timeout=5)
    assert response.status_code == 401
    assert await rows() == 0


@EXAMPLES
@given(
    update_id=st.integers(1, 2**62),
    kind=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=20).filter(
        lambda k: k not in ("message", "channel_post")
    ),
    payload=json_values,
)
async def test_update_types_we_do_not_handle_get_200_and_change_nothing(
    client: httpx.AsyncClient, rows: Callable[[], Awaitable[int]], update_id: int, kind: str, payload: Any
) -> None:
    body = json.dumps({"update_id": update_id, kind: payload}).encode()
    headers = {SECRET_HEADER: SECRET, "content-type": "application/json"}
    response = await client.post("/webhook", content=body, headers=headers, timeout=5)
    # An update type the framework declares (edited_message, callback_query...) with a payload of the
    # wrong shape is a 400; anything else is Telegram's business and acknowledged.
    assert response.status_code in (200, 400)
    if kind not in UPDATE_KINDS:
        assert response.status_code == 200
    assert await rows() == 0


@EXAMPLES
@given(
    update_id=st.integers(1, 2**62),
    kind=st.sampled_from(UPDATE_KINDS),
    payload=json_scalars.filter(lambda v: v is not None) | st.lists(json_scalars, max_size=3) | st.just({}),
)
async def test_every_kind_of_the_bot_api_with_a_payload_that_is_not_its_type_gets_400(
    client: httpx.AsyncClient, rows: Callable[[], Awaitable[int]], update_id: int, kind: str, payload: Any
) -> None:
    """All 25 kinds are typed now: a poll that is a number, an inline query with none of its fields, a
    chat boost that is a list are not Updates, whatever the bot handles."""
    body = json.dumps({"update_id": update_id, kind: payload}).encode()
    headers = {SECRET_HEADER: SECRET, "content-type": "application/json"}
    response = await client.post("/webhook", content=body, headers=headers, timeout=5)
    assert response.status_code == 400, (body[:200], response.text)
    assert await rows() == 0
