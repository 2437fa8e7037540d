"""What a handler gets: the update, the bot's identity, its sessions, and queues for outgoing calls and
for timers."""

from __future__ import annotations

import math
import uuid
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import msgspec

from .files import MAX_UPLOAD_BYTES, prepare
from .kinds import KindAccessors
from .methods import ApiMethods, OutboxMethods
from .rules import Command, parse_command
from .session import NoSuchSession, SessionNotLoaded, SessionSlot, non_finite
from .storage import DueTimer, OutgoingCall, TimerChange
from .telegram import BotApi
from .types import CallbackQuery, Chat, File, Message, Update, User

__all__ = ["BotIdentity", "Context", "Fire", "ImmediateApi", "Outbox", "QueuedCall", "timer_context"]

S = TypeVar("S")

DEFAULT_SESSION = "session"


@dataclass(frozen=True, slots=True)
class BotIdentity:
    """Who this bot is: its id (the number before the colon in its token) and its username."""

    id: int
    username: str


class QueuedCall:
    """A Bot API call a handler queued. It is sent after the update's transaction commits (never if it
    rolls back), so there is no result yet: no sent message, no message id.

    Awaiting it is allowed, since `await ctx.reply(...)` is what grammY users write, and returns this same
    object at once; it does not wait for the send. For a result now, use `ctx.api`.
    """

    __slots__ = ("call",)

    def __init__(self, call: OutgoingCall) -> None:
        self.call = call

    @property
    def method(self) -> str:
        return self.call.method

    @property
    def params(self) -> dict[str, Any]:
        return self.call.params

    def __await__(self) -> Generator[Any, None, QueuedCall]:
        return self
        yield  # a generator that finishes at once: awaiting costs no trip through the event loop

    def __repr__(self) -> str:
        return f"<QueuedCall {self.method} (sent after commit)>"


class ImmediateApi(ApiMethods):
    """Bot API calls made now, inside the handler, for what it needs the answer to (getChatMember,
    getChat): `await ctx.api.get_chat_member(chat_id=..., user_id=...)`, the result decoded into
    `bot.types`. Each call is bounded by a timeout and raises BotApiError if it fails or times out.

    Caveat: the handler runs inside the update's transaction, holding its session rows locked, so every
    other update of the same chat (or user, per the key) waits for as long as this call takes. Prefer
    `ctx.call`/`ctx.reply` (sent after the commit) for anything whose answer the handler does not need;
    and a call made here is made again if the update is redelivered (a failed commit, a 503) or, with
    DB_CONCURRENCY=optimistic, run again after a conflict (docs/SCALING.md), so make only calls that are
    safe to repeat.
    """

    def __init__(self, api: BotApi | None, timeout: float, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self._api = api
        self._timeout = timeout
        # The largest file a call may upload (UPLOAD_MAX_BYTES), here and in the calls a handler queues.
        self.max_upload_bytes = max_upload_bytes

    def _client(self, what: str) -> BotApi:
        if self._api is None:
            raise RuntimeError(f"ctx.api.{what}: no BOT_TOKEN, so there is no Bot API to ask")
        return self._api

    async def call(self, method: str, **params: Any) -> Any:
        api = self._client(f"call({method!r})")
        values, files = prepare(method, params, self.max_upload_bytes)
        # The client's own deadline, not asyncio.timeout: that would raise TimeoutError, not BotApiError.
        return await api.call(method, values, files=files, timeout=self._timeout)

    async def download(self, file: File | str, into: Path | IO[bytes]) -> int:
        """Download a file Telegram keeps (a `File` from `get_file`, or a file_id: a photo's, a
        document's...) into a path or a binary stream (`io.BytesIO()` for the bytes); returns its size.
        Within the client's total deadline (BOT_API_TIMEOUT), not API_CALL_TIMEOUT: a file takes longer
        than a call, and the handler holds its chat's lock meanwhile, so download in a handler only what
        it needs now."""
        api = self._client("download()")
        if isinstance(file, str) or file.file_path is None:
            file_id = file if isinstance(file, str) else file.file_id
            found = await api.call("getFile", {"file_id": file_id}, timeout=self._timeout)
            file = msgspec.convert(found, File)
        if file.file_path is None:
            raise ValueError(f"download(): Telegram gave no file_path for {file.file_id!r} (over 20 MB?)")
        return await api.download(file.file_path, into)


@dataclass(frozen=True, slots=True)
class Fire:
    """What a timer's handler finds in `ctx.timer`: which timer fired, with what, and how late."""

    name: str
    key: str
    payload: Any  # as scheduled, through JSON: dicts, lists, strings, numbers, booleans, None
    due_at: float  # epoch seconds
    late: float  # seconds after due_at that it was picked to fire: more than a moment if the bot was down


_NO_API = ImmediateApi(None, 0)
_UNPARSED: Any = object()


class Context(KindAccessors, Generic[S]):
    """One update as a handler, middleware or filter sees it. Filters get it before the sessions are
    loaded; handlers and middleware after. Every update kind has its accessor (`ctx.inline_query`,
    `ctx.poll_answer`...: `bot.kinds.KindAccessors`), None unless the update is of that kind."""

    def __init__(self, update: Update, me: BotIdentity, api: ImmediateApi = _NO_API) -> None:
        self.update = update
        self.me = me
        self.api = api
        self.calls: list[OutgoingCall] = []
        self.timers: list[TimerChange] = []
        self.timer: Fire | None = None  # set when this is a timer's fire, not an update
        self._slots: Mapping[str, SessionSlot[Any]] | None = None
        self._command: Any = _UNPARSED

    def attach_sessions(self, slots: Mapping[str, SessionSlot[Any]]) -> None:
        """Called by the pipeline once the update's transaction is open."""
        self._slots = slots

    # --- the update --------------------------------------------------------------------------------

    @property
    def message(self) -> Message | None:
        """A new message or channel post (None for edits: `ctx.update.edited_message`)."""
        return self.update.new_message

    @property
    def chat(self) -> Chat | None:
        return self.update.chat

    @property
    def from_user(self) -> User | None:
        return self.update.from_user

    @property
    def data(self) -> str | None:
        """The pressed button's callback data."""
        query = self.update.callback_query
        return None if query is None else query.data

    @property
    def command(self) -> Command | None:
        """The command this message gives this bot (`/name args`, `/name@ourbot args`), if any."""
        if self._command is _UNPARSED:  # parsed once: every command filter asks (functools' cache locks)
            message = self.update.new_message
            self._command = None if message is None else parse_command(message, self.me.username)
        command: Command | None = self._command
        return command

    # --- sessions ----------------------------------------------------------------------------------

    def _slot(self, name: str) -> SessionSlot[Any]:
        if self._slots is None:
            raise SessionNotLoaded("sessions are not loaded yet: filters run before the database is touched")
        try:
            return self._slots[name]
        except KeyError:
            raise NoSuchSession(
                f"no session named {name!r} is configured for this bot (configured: {sorted(self._slots)})"
            ) from None

    @property
    def session(self) -> S:
        """The update's session, loaded before the handler ran (see `get_session` for lazy ones)."""
        value: S = self._slot(DEFAULT_SESSION).get()
        return value

    @session.setter
    def session(self, value: S | None) -> None:
        self._slot(DEFAULT_SESSION).set(value)

    async def get_session(self, name: str = DEFAULT_SESSION) -> Any:
        """Load (and lock) a session now if it is lazy; return it."""
        slot = self._slot(name)
        await slot.load()
        return slot.get()

    def fragment(self, name: str) -> Any:
        """A named session of a bot with several (see `Bot(sessions=...)`)."""
        return self._slot(name).get()

    def set_fragment(self, name: str, value: Any) -> None:
        """Replace a named session; None deletes it (as `ctx.session = None` does for the default one)."""
        self._slot(name).set(value)

    # --- calls sent after the commit ---------------------------------------------------------------

    @property
    def outbox(self) -> Outbox:
        """Every Bot API method, typed, queued to be sent after the update's transaction commits:
        `ctx.outbox.send_photo(chat_id=..., photo=...)`. For a result now, `await ctx.api.send_photo(...)`."""
        return Outbox(self)

    def call(self, method: str, **params: Any) -> QueuedCall:
        """Queue a Bot API call. It is sent after the update's transaction commits, never before. Its
        files (InputFile) are read now, into the outbox with it: a path or a stream may be gone later."""
        values, files = prepare(method, params, self.api.max_upload_bytes)
        call = OutgoingCall(method, values, files)
        self.calls.append(call)
        return QueuedCall(call)

    def reply(self, text: str, **params: Any) -> QueuedCall:
        """Queue a message to the chat (and forum topic) this update came from, a button press's included."""
        chat = self.update.chat
        if chat is None:
            raise ValueError(f"reply(): this {self.update.kind or 'update'} has no chat to reply to")
        message = self.update.any_message
        if message is not None and message.is_topic_message and message.message_thread_id is not None:
            params.setdefault("message_thread_id", message.message_thread_id)
        return self.call("sendMessage", chat_id=chat.id, text=text, **params)

    def answer(self, text: str | None = None, **params: Any) -> QueuedCall:
        """Answer the pressed button (answerCallbackQuery): stops the client's spinner; `text` shows a
        notification (`show_alert=True`: an alert)."""
        query = self._query("answer")
        if text is not None:
            params["text"] = text
        return self.call("answerCallbackQuery", callback_query_id=query.id, **params)

    def edit_text(self, text: str, **params: Any) -> QueuedCall:
        """Edit the message whose button was pressed (editMessageText), e.g. with a new `reply_markup`."""
        query = self._query("edit_text")
        if query.inline_message_id is not None:
            params["inline_message_id"] = query.inline_message_id
        elif query.message is not None:
            params.update(chat_id=query.message.chat.id, message_id=query.message.message_id)
        else:
            raise ValueError("edit_text(): the button press names no message")
        return self.call("editMessageText", text=text, **params)

    # --- timers, committed with the update ---------------------------------------------------------

    def schedule(
        self,
        handler: str,
        *,
        after: float | None = None,
        at: float | None = None,
        payload: Any = None,
        name: str | None = None,
        key: str | None = None,
    ) -> str:
        """Run the timer handler `handler` (`@bot.timer(handler)`) `after` seconds from now, or `at` an
        epoch time, once, with `payload` (anything JSON can hold) in `ctx.timer.payload`. Returns the
        timer's name.

        Scheduled only if this update commits; fired once, by whichever process finds it due, even
        across restarts. The fire runs like an update of this chat, from this sender: the same sessions,
        `ctx.reply` to this chat. `after=0` runs it right after the commit, off the webhook's deadline.

        `key` and `name` identify the timer: scheduling one again replaces it, `cancel(name)` removes
        it. The key defaults to this chat's id (a timer's own key in a fire); the fires of one key run
        one at a time, earliest first. Without a name each call schedules a new timer."""
        if (after is None) == (at is None):
            raise TypeError("schedule(): give after= (seconds from now) or at= (epoch seconds), one of them")
        when = after if after is not None else at
        if not isinstance(when, int | float) or not math.isfinite(when) or (after is not None and after < 0):
            raise ValueError(
                f"schedule(): after/at must be a finite number of seconds (after >= 0), not {when!r}"
            )
        encoded = msgspec.json.encode(payload).decode()
        if "\\u0000" in encoded:
            raise ValueError("schedule(): the payload holds a NUL character, which the database cannot store")
        if "null" in encoded and (found := non_finite(payload, "$")) is not None:
            raise ValueError(
                f"schedule(): the payload's {found[0]} is {found[1]!r}, which JSON cannot hold (it would come"
                " back as None)"
            )
        timer_name = name if name is not None else uuid.uuid4().hex
        self.timers.append(
            TimerChange(self._timer_key(key), timer_name, handler, encoded, self._origin(), at, after)
        )
        return timer_name

    def cancel(self, name: str, *, key: str | None = None) -> None:
        """Cancel the timer `name` of `key` (default: as in `schedule`) if it has not fired, when this
        update commits. Cancelling a timer that does not exist is not an error."""
        self.timers.append(TimerChange(self._timer_key(key), name))

    def _timer_key(self, key: str | None) -> str:
        if key is not None:
            return key
        if self.timer is not None:
            return self.timer.key
        chat = self.update.chat
        if chat is None:
            raise ValueError(f"schedule(): this {self.update.kind or 'update'} has no chat: pass key=")
        return str(chat.id)

    def _origin(self) -> str:
        """Where a timer comes from, stored with it: a Bot API Message without content, so that the
        fire's stand-in update has the chat, sender and topic its sessions are keyed by and its replies
        go to."""
        chat = self.update.chat
        if chat is None:
            return "null"
        message = self.update.any_message
        topic = (
            message is not None and bool(message.is_topic_message) and message.message_thread_id is not None
        )
        origin = Message(
            message_id=0,
            date=0 if message is None else message.date,
            chat=chat,
            from_user=self.update.from_user,
            message_thread_id=message.message_thread_id if topic and message is not None else None,
            is_topic_message=True if topic else None,
        )
        return msgspec.json.encode(origin).decode()

    def _query(self, what: str) -> CallbackQuery:
        query = self.update.callback_query
        if query is None:
            raise ValueError(f"{what}(): this {self.update.kind or 'update'} is not a button press")
        return query


class Outbox(OutboxMethods[QueuedCall]):
    """`ctx.outbox`: the typed spelling of `ctx.call`."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Context[Any]) -> None:
        self._ctx = ctx

    def call(self, method: str, **params: Any) -> QueuedCall:
        return self._ctx.call(method, **params)


def timer_context(timer: DueTimer, me: BotIdentity, api: ImmediateApi = _NO_API) -> Context[Any]:
    """The context of a timer's fire. Its update is a stand-in: id the timer's id negated (so the
    fire's replies are keyed apart from every real update's), and a message without content from the
    chat, sender and topic the timer was scheduled from, so that session keys and `ctx.reply` work as
    they did there."""
    message = msgspec.json.decode(timer.origin, type=Message | None)
    ctx: Context[Any] = Context(Update(update_id=-timer.id, message=message), me, api)
    ctx.timer = Fire(timer.name, timer.key, msgspec.json.decode(timer.payload), timer.due_at, timer.late)
    return ctx
