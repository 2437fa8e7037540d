"""Telegram Bot API: the slice of its types this bot reads, and an async client for its methods.

Types are msgspec Structs: decoding validates the shape (an `update_id` that is a string is a 400, not a
crash deep in a handler) and ignores every field we do not declare, so Telegram can add fields freely.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import httpx
import msgspec

from .errors import BotError
from .limits import TooLarge, read_at_most

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


# Telegram ids are signed 64-bit (chat ids reach 52 bits); a bigger number cannot be a real id and would
# overflow PostgreSQL's bigint, so it is rejected at the door.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class User(msgspec.Struct, frozen=True):
    id: Int64
    is_bot: bool = False
    first_name: str = ""
    username: str | None = None
    # Only in getMe: False means privacy mode, where a bot in a group sees commands but not plain text.
    can_read_all_group_messages: bool | None = None


class Chat(msgspec.Struct, frozen=True):
    id: Int64
    type: str
    title: str | None = None
    username: str | None = None
    is_forum: bool = False


class MessageEntity(msgspec.Struct, frozen=True):
    type: str
    offset: int
    length: int


class Message(msgspec.Struct, frozen=True):
    message_id: int
    chat: Chat
    date: int = 0
    from_user: User | None = msgspec.field(default=None, name="from")
    message_thread_id: int | None = None
    is_topic_message: bool = False
    text: str | None = None
    entities: tuple[MessageEntity, ...] = ()
    caption: str | None = None
    migrate_to_chat_id: Int64 | None = None
    migrate_from_chat_id: Int64 | None = None


class CallbackQuery(msgspec.Struct, frozen=True):
    """A press on an inline keyboard button. `message` is the message the keyboard is attached to (absent
    for inline-mode messages, which have `inline_message_id` instead; when the message is older than 48 h
    Telegram sends only its chat and id, with `date` 0)."""

    id: str
    from_user: User = msgspec.field(name="from")
    chat_instance: str = ""
    message: Message | None = None
    inline_message_id: str | None = None
    data: str | None = None


class ChatMember(msgspec.Struct, frozen=True):
    """One member's status in a chat: creator, administrator, member, restricted, left or kicked."""

    status: str
    user: User


class ChatMemberUpdated(msgspec.Struct, frozen=True):
    """`my_chat_member`: the bot itself was added, promoted, removed...; `chat_member`: someone else."""

    chat: Chat
    from_user: User = msgspec.field(name="from")
    date: int = 0
    old_chat_member: ChatMember | None = None
    new_chat_member: ChatMember | None = None


class ReactionType(msgspec.Struct, frozen=True):
    type: str  # "emoji", "custom_emoji" or "paid"
    emoji: str | None = None
    custom_emoji_id: str | None = None


class MessageReactionUpdated(msgspec.Struct, frozen=True):
    """A user changed their reactions to a message (the bot must be an administrator to receive it)."""

    chat: Chat
    message_id: int
    date: int = 0
    user: User | None = None  # absent when an anonymous administrator or a channel reacted
    old_reaction: tuple[ReactionType, ...] = ()
    new_reaction: tuple[ReactionType, ...] = ()


# Every field of Update that this framework routes, in Telegram's order. Telegram sends exactly one per
# update; an update of another kind (a poll, an inline query...) decodes with none of them and is ignored.
UPDATE_KINDS = (
    "message",
    "edited_message",
    "channel_post",
    "edited_channel_post",
    "message_reaction",
    "callback_query",
    "my_chat_member",
    "chat_member",
)


class Update(msgspec.Struct, frozen=True):
    update_id: Int64
    message: Message | None = None
    edited_message: Message | None = None
    channel_post: Message | None = None
    edited_channel_post: Message | None = None
    message_reaction: MessageReactionUpdated | None = None
    callback_query: CallbackQuery | None = None
    my_chat_member: ChatMemberUpdated | None = None
    chat_member: ChatMemberUpdated | None = None

    @property
    def kind(self) -> str | None:
        """Which kind of update this is (one of UPDATE_KINDS), None for a kind not routed here."""
        for kind in UPDATE_KINDS:
            if getattr(self, kind) is not None:
                return kind
        return None

    @property
    def new_message(self) -> Message | None:
        """A newly sent message in any kind of chat: what counting and commands look at."""
        return self.message or self.channel_post

    @property
    def any_message(self) -> Message | None:
        """The message this update is about: new, edited, or the one a pressed button is attached to."""
        message = self.message or self.channel_post or self.edited_message or self.edited_channel_post
        if message is None and self.callback_query is not None:
            return self.callback_query.message
        return message

    @property
    def chat(self) -> Chat | None:
        """The chat this update happened in; None for kinds without one (an inline-mode button press)."""
        message = self.any_message
        if message is not None:
            return message.chat
        member = self.my_chat_member or self.chat_member
        if member is not None:
            return member.chat
        return self.message_reaction.chat if self.message_reaction is not None else None

    @property
    def from_user(self) -> User | None:
        """Who caused this update; None for channel posts and anonymous reactions."""
        if self.callback_query is not None:
            return self.callback_query.from_user
        member = self.my_chat_member or self.chat_member
        if member is not None:
            return member.from_user
        if self.message_reaction is not None:
            return self.message_reaction.user
        message = self.any_message
        return message.from_user if message is not None else None


class InvalidUpdate(BotError, ValueError):
    """The body is not JSON, or not a Telegram Update object."""


_update_decoder = msgspec.json.Decoder(Update)


def decode_update(body: bytes) -> Update:
    """Decode one webhook body into an Update, or raise InvalidUpdate saying what is wrong."""
    try:
        update: Update = _update_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidUpdate(f"not a Telegram Update: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec reports invalid UTF-8 inside a string as UnicodeDecodeError, not DecodeError.
        raise InvalidUpdate(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidUpdate("body is nested too deeply to be a Telegram Update") from None
    return update


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
        self._client = client
        self.timeout = timeout

    # A per-call deadline, as httpx's own `timeout=`: the callers' asyncio.timeout would raise
    # TimeoutError, not the BotApiError every caller handles.
    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """Call `method` with `params` (sent as JSON) and return its `result`, within `timeout` seconds
        (default: the client's)."""
        content = msgspec.json.encode(params or {})
        deadline = self.timeout if timeout is None else timeout
        events: list[str] = []

        async def trace(event: str, info: dict[str, Any]) -> None:
            events.append(event)

        try:
            async with asyncio.timeout(deadline):
                async with self._client.stream(
                    "POST",
                    self._base + method,
                    content=content,
                    headers={"content-type": "application/json"},
                    extensions={"trace": trace},
                ) as response:
                    body = await read_at_most(response.aiter_bytes(), MAX_ANSWER_BYTES)
        except TimeoutError:
            # Sent unless the trace shows it never got that far (a transport without traces, such as
            # the playground's, says nothing: then it may have been).
            sent = not events or not _SENDING.isdisjoint(events)
            raise BotApiError(method, f"no answer within {deadline:g} s", may_have_arrived=sent) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Never sent: a retry cannot double anything.
            raise BotApiError(method, f"no connection to the Bot API: {exc!r}") from exc
        # From here on the request went out: whatever happened to the answer, Telegram may have acted on it.
        except httpx.HTTPError as exc:
            # A read timeout, a reset, a truncated or malformed answer.
            raise BotApiError(method, f"no answer from the Bot API: {exc!r}", may_have_arrived=True) from exc
        except TooLarge:
            raise BotApiError(
                method, f"answer over {MAX_ANSWER_BYTES} bytes: not the Bot API", may_have_arrived=True
            ) from None
        try:
            answer = _response_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as exc:
            # An HTML error page from a proxy, an empty body, invalid UTF-8, absurd nesting... msgspec
            # raises the last two as UnicodeDecodeError and RecursionError, not as DecodeError.
            what = "empty" if not body else f"{type(exc).__name__}: {str(exc)[:200]}"
            raise BotApiError(
                method, f"unreadable HTTP {response.status_code} answer ({what})", may_have_arrived=True
            ) from None
        if not answer.ok:
            raise BotApiError(
                method,
                answer.description or "no description",
                answer.error_code if answer.error_code is not None else response.status_code,
                answer.parameters.retry_after,
                migrate_to_chat_id=answer.parameters.migrate_to_chat_id,
            )
        return answer.result

    async def get_me(self) -> User:
        return msgspec.convert(await self.call("getMe"), User)
