"""Sessions, after grammY's session middleware: data per chat, loaded before the handlers, saved after.

Top to bottom: the key functions, the options (`session()`), and the per-update state machine
(`SessionSlot`) that the pipeline drives: load (and lock) → handlers read and change `ctx.session` → save.

Where grammY reads and writes with two independent storage calls, we do both inside the update's
transaction with the row locked in between (`DB_CONCURRENCY=locked`), or write only if the row is still
the version read, else run the update again with the lock (`optimistic`, the default), so concurrent
updates of one chat never overwrite each other's changes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec

from .callables import check_plain
from .errors import BotError
from .storage import Moved, Storage, StoredSession, Transaction
from .types import Update

__all__ = [
    "AlreadyApplied",
    "NoSessionKey",
    "NoSuchSession",
    "SessionConfig",
    "SessionDecodeError",
    "SessionError",
    "SessionNotLoaded",
    "SessionSlot",
    "SessionValueError",
    "chat_key",
    "chat_user_key",
    "session",
    "user_key",
]

S = TypeVar("S")


def chat_key(update: Update) -> str | None:
    """The default key: one session per chat, whoever writes in it. None when the update has no chat."""
    chat = update.chat
    return None if chat is None else str(chat.id)


def user_key(update: Update) -> str | None:
    """One session per person, following them across chats (grammY's `ctx.from?.id`). None for updates
    with no sender (channel posts, anonymous reactions).

    The caveat grammY gives for webhooks: one person's updates from different chats, and their button
    presses and reactions, arrive concurrently, unlike one chat's messages. With a read and a write as two
    separate calls, two of them would overwrite each other's change. Here the row lock makes them take turns
    (docs/SESSIONS.md, "What goes wrong with other keys"), so this key is exact, at the price that one
    person's updates in different chats wait for each other.
    """
    user = update.from_user
    return None if user is None else str(user.id)


def chat_user_key(update: Update) -> str | None:
    """One session per person per chat (grammY's `${ctx.from?.id}/${ctx.chat?.id}`), for example a
    player's score in one group. None unless the update has both a chat and a sender. The caveat of
    `user_key` applies: a person's button presses race their messages in the same chat, and the row lock
    is what keeps that exact."""
    chat, user = update.chat, update.from_user
    return None if chat is None or user is None else f"{chat.id}/{user.id}"


class SessionError(BotError):
    """Base of the errors a handler gets for using a session wrongly. Not an AttributeError, so that
    `getattr(ctx, "session", None)` raises instead of quietly answering None."""


class NoSessionKey(SessionError):
    """This update has no session: the key function returned None for it (for instance the chat key for
    an update without a chat)."""


class SessionNotLoaded(SessionError):
    """A lazy session used before `await ctx.get_session()`, or any session used by a filter (filters run
    before the database is touched)."""


class NoSuchSession(SessionError):
    """No session of that name is configured for the bot."""


class SessionDecodeError(BotError):
    """Stored data does not fit the session type (and no migration made it fit): the type changed in code
    and the row was not migrated. Names the session, the key and the field; docs/SESSIONS.md ("Rows that
    no longer decode") says how to migrate such rows."""


class SessionValueError(BotError):
    """A handler left a session value that does not fit the session type, or that cannot be stored as
    JSON (an object of a class msgspec does not know, a float NaN, a list holding itself). Raised when
    the update saves, so that update fails and the stored row keeps its last good value; stored, the
    value would fail every later update of its key instead."""


class AlreadyApplied(BotError):
    """This update was applied before (a redelivery): its handlers must not run again."""


Migration = Callable[[Any], Any]


@dataclass(frozen=True)
class SessionConfig(Generic[S]):
    """How one kind of session is keyed, created, stored and upgraded. Build it with `session()`."""

    initial: Callable[[], S] | None
    data_type: type[S]
    get_session_key: Callable[[Update], str | None] = chat_key
    prefix: str = ""
    lazy: bool = False
    ttl: float | None = None
    version: int = 0
    migrations: Mapping[int, Migration] = field(default_factory=dict)
    merge: Callable[[S, S], S] | None = None
    storage: Storage | None = None  # None: the bot's storage, in the update's main transaction
    name: str = "session"  # what the bot calls it (`Bot` sets it), for error messages
    # Built once: a typed decoder is about half the cost of msgspec.json.decode(data, type=...) per call.
    _decoder: msgspec.json.Decoder[S] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_decoder", msgspec.json.Decoder(self.data_type))

    def key(self, update: Update) -> str | None:
        key = self.get_session_key(update)
        return None if key is None else self.prefix + key

    def _where(self, key: str) -> str:
        return f"session {self.name!r}, key {key!r}"

    def encode(self, key: str, value: S) -> str:
        """The JSON stored for `value`. Raises SessionValueError, naming the field, when there is none."""
        try:
            return msgspec.json.encode(value).decode()
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            path, error = _unencodable(value, "$", set()) or ("$", exc)
            raise SessionValueError(
                f"{self._where(key)}: the value cannot be stored, field `{path}`: {error}. Nothing was saved: "
                "the stored row keeps its last good value"
            ) from exc

    def check(self, key: str, data: str, value: S) -> None:
        """Raise SessionValueError, naming the field, unless `data` (encoded from a handler's `value`)
        reads back as `data_type`. Encoding does not validate: `ctx.session.n = "seven"` on an int field
        encodes fine and would fail every later read of the row instead of the update that wrote it.
        Reading back is msgspec's own validation, and costs about what one read of the row does."""
        try:
            decoded = self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise SessionValueError(
                f"{self._where(key)}: the value does not fit {self.data_type.__name__}, {_field(exc)}. Nothing "
                "was saved: the stored row keeps its last good value"
            ) from exc
        # Only data holding a null can hide a NaN or infinity, and only a value it does not read back as.
        if "null" in data and decoded != value:
            self.check_finite(key, value)

    def check_finite(self, key: str, value: S) -> None:
        """Raise SessionValueError naming the first NaN or infinity in `value`. JSON has neither: msgspec
        writes them as null, which a type that allows None reads back as valid."""
        if (found := non_finite(value, "$")) is not None:
            raise SessionValueError(
                f"{self._where(key)}: the value cannot be stored, field `{found[0]}`: {found[1]!r} is no JSON"
                " number. Nothing was saved: the stored row keeps its last good value"
            )

    def decode(self, key: str, stored: StoredSession) -> S:
        """Decode stored data, first upgrading it through `migrations` if an older version wrote it."""
        if stored.version > self.version:
            # Decoding it anyway would drop the fields this code does not know, and the write-back
            # (at our older version) would make that loss permanent: typical after rolling back a deploy.
            raise SessionDecodeError(
                f"{self._where(key)} is version {stored.version}, newer than this code's version "
                f"{self.version}: not decoded, so that it is not downgraded"
            )
        try:
            if stored.version == self.version:
                return self._decoder.decode(stored.data)
            raw = json.loads(stored.data)
            for version in range(stored.version, self.version):
                if version not in self.migrations:
                    raise SessionDecodeError(
                        f"{self._where(key)} is version {stored.version}, and no migration upgrades "
                        f"version {version} (known: {sorted(self.migrations)})"
                    )
                raw = self.migrations[version](raw)
            return msgspec.convert(raw, type=self.data_type)
        except msgspec.ValidationError as exc:
            raise SessionDecodeError(
                f"{self._where(key)}: the stored row (version {stored.version}) no longer decodes as "
                f"{self.data_type.__name__}, {_field(exc)}. Migrate the row (docs/SESSIONS.md, "
                '"Rows that no longer decode")'
            ) from exc
        except (msgspec.DecodeError, ValueError) as exc:
            raise SessionDecodeError(
                f"{self._where(key)}: the stored row (version {stored.version}) is not JSON: {exc}"
            ) from exc


def _field(error: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.n`" as "field `$.n`: Expected `int`, got `str`"."""
    message, at, path = str(error).rpartition(" - at ")
    return f"field {path}: {message}" if at else f"the whole value: {error}"


def _parts(value: Any, path: str) -> list[tuple[str, Any]] | None:
    """The parts of a container msgspec encodes, each with its path; None for anything else."""
    if isinstance(value, msgspec.Struct):
        return [(f"{path}.{name}", getattr(value, name)) for name in value.__struct_fields__]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f"{path}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, dict):
        return [(f"{path}.{key}", item) for key, item in value.items()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [(f"{path}[{n}]", item) for n, item in enumerate(value)]
    return None


def non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """The path of the first NaN or infinity in `value` (JSON has neither: msgspec writes them as null),
    and it; None if there is none. Only for a value that encoded, so holds no cycle."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    for sub_path, part in _parts(value, path) or ():
        found = non_finite(part, sub_path)
        if found is not None:
            return found
    return None


def _unencodable(value: Any, path: str, within: set[int]) -> tuple[str, str] | None:
    """The path of the innermost part of `value` that msgspec cannot encode, and why; None if it can.
    Only called once encoding failed, so its cost (encoding each part again) is paid by failures only.
    `within` holds the containers on the path so far: a list holding itself is found, not recursed."""
    try:
        msgspec.json.encode(value)
        return None
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        error = str(exc)
    if id(value) in within:
        return path, "the value contains itself"
    parts = _parts(value, path)
    if parts is None:
        return path, error
    within.add(id(value))
    for sub_path, part in parts:
        found = _unencodable(part, sub_path, within)
        if found is not None:
            return found
    within.discard(id(value))
    return path, error  # every part encodes alone: the container itself is the problem (a dict's keys)


def session(
    initial: Callable[[], S] | None = None,
    *,
    data_type: type[S] | None = None,
    get_session_key: Callable[[Update], str | None] = chat_key,
    prefix: str = "",
    lazy: bool = False,
    ttl: float | None = None,
    version: int = 0,
    migrations: Mapping[int, Migration] | None = None,
    merge: Callable[[S, S], S] | None = None,
    storage: Storage | None = None,
) -> SessionConfig[S]:
    """Describe a session.

    `initial` builds a fresh session for a key that has none (a factory, so chats never share one
    object); when it is a class, it is also the type the stored JSON is decoded into. Without it, a
    key with no session reads as None and handlers create it (`ctx.session = Counter()`). `lazy` loads
    and locks the session only when a handler first asks for it (`await ctx.get_session()`). `ttl`
    makes a session read as new that many seconds after it was last written. `version` and
    `migrations` (a map from an old version to a function that upgrades its decoded JSON by one step)
    let the session's shape change while old rows are upgraded on read and written back in the new
    shape.

    `get_session_key` maps an update to its session's key (None: no session for this update). The
    default, `chat_key`, is one session per chat; `user_key` and `chat_user_key` key by person (read
    their caveat about webhooks), and any function of the update will do.

    `merge(old, new)` follows a group when Telegram upgrades it to a supergroup (a new chat id): the
    old chat's session is combined into the new chat's and removed, exactly once. It applies only to
    sessions keyed by chat id (the default key), and `Bot` refuses it with any other key function, which
    it could not follow; without it, a migrated group starts afresh.

    `storage` keeps this session somewhere other than the bot's storage (see docs/SESSIONS.md for what
    that costs: the two transactions commit one after the other, not atomically).
    """
    if data_type is None:
        if not isinstance(initial, type):
            raise TypeError("session(): pass data_type= (the session class) unless initial is that class")
        data_type = initial
    check_plain(get_session_key, "key function", "update")
    if initial is not None:
        check_plain(initial, "initial", "")
    if merge is not None:
        check_plain(merge, "merge", "old, new")
    for migrate in (migrations or {}).values():
        check_plain(migrate, "migration", "data")
    return SessionConfig(
        initial=initial,
        data_type=data_type,
        get_session_key=get_session_key,
        prefix=prefix,
        lazy=lazy,
        ttl=ttl,
        version=version,
        migrations=dict(migrations or {}),
        merge=merge,
        storage=storage,
    )


_UNLOADED: Any = object()


class SessionSlot(Generic[S]):
    """One session of one update: not loaded → loaded (row locked) → saved.

    `claim` is called before the first read of the update's transaction; it raises AlreadyApplied for a
    redelivered update, so a lazy session that is never touched never claims anything.
    """

    def __init__(
        self,
        config: SessionConfig[S],
        key: str | None,
        tx: Transaction,
        claim: Callable[[], Awaitable[None]],
    ) -> None:
        self.config = config
        self.key = key
        self._tx = tx
        self._claim = claim
        self._value: Any = _UNLOADED  # S, or None for "no session"
        self._stored: str | None = None  # what the storage holds, as we encode it; None for nothing
        self._upgraded = False

    @property
    def loaded(self) -> bool:
        return self._value is not _UNLOADED

    @property
    def stored(self) -> bool:
        """Whether the storage held a session for this key when it was loaded."""
        return self._stored is not None

    async def load(self) -> None:
        if self._value is not _UNLOADED:  # (not `loaded`: a property call per session per update)
            return
        if self.key is None:
            self._value = None
            return
        await self._claim()
        stored = await self._tx.read(self.key)
        if isinstance(stored, Moved):
            # The chat was a group and is a supergroup now: a late update for its old id (a redelivery)
            # belongs to the new chat's session. The forward stays locked until the end, so the move
            # is not undone meanwhile; old then new is the order the move itself locks them in.
            self.key = stored.key
            stored = await self._tx.read(self.key)
            if isinstance(stored, Moved):
                # Only a basic group moves, and only to a supergroup, which never moves again.
                raise SessionDecodeError(f"{self.config._where(self.key)} moved again, to {stored.key!r}")
        if stored is None:
            self._value = None if self.config.initial is None else self.config.initial()
        else:
            self._value = self.config.decode(self.key, stored)
            # Re-encoded rather than kept as read: PostgreSQL's jsonb reorders keys and spaces, and the
            # comparison in save() must see "unchanged" as unchanged.
            self._stored = self.config.encode(self.key, self._value)
            self._upgraded = stored.version != self.config.version

    def get(self) -> S:
        """The session; None when there is none (no `initial`, or set to None in this update)."""
        if self._value is _UNLOADED:
            raise SessionNotLoaded(
                "the session is lazy and not loaded yet: `await ctx.get_session()` (or `get_session(name)`) first"
            )
        if self.key is None:
            raise NoSessionKey(
                "this update has no session: get_session_key returned None for it "
                "(the default key is the chat id, and this update has no chat)"
            )
        value: S = self._value
        return value

    def set(self, value: S | None) -> None:
        if self.key is None:
            raise NoSessionKey("cannot set a session for an update without a session key")
        if not self.loaded:
            # grammY writes such a value blindly. Here the read is what locks the row and records the
            # update as applied, and save() needs to know what is stored to delete it or to tell "reset
            # to initial" from "unchanged"; so a lazy session is loaded first.
            raise SessionNotLoaded(
                "the session is lazy and not loaded yet: `await ctx.get_session()` (or `get_session(name)`) "
                "before assigning to it"
            )
        self._value = value

    def discard_changes(self) -> None:
        """Back to the session as loaded: a handler failed, and the error hook must see (and save) the
        state before it, as if the handler never ran. The row stays locked and the update claimed."""
        if not self.loaded or self.key is None:
            return
        if self._stored is not None:
            self._value = self.config.decode(self.key, StoredSession(self._stored, self.config.version))
        else:
            self._value = None if self.config.initial is None else self.config.initial()

    async def save(self) -> None:
        """Write back what changed: nothing if unchanged, a delete if the session was set to None.
        Raises SessionValueError for a value that does not fit the session type or cannot be stored,
        before anything is written, so the update fails and the row keeps its last good value."""
        if self._value is _UNLOADED or self.key is None:
            return
        if self._value is None:
            if self._stored is not None:
                await self._tx.delete(self.key)
            return
        config = self.config
        data = config.encode(self.key, self._value)
        if data != self._stored or self._upgraded:
            initial = config.initial
            if self._stored is None and initial is not None and data == config.encode(self.key, initial()):
                # A new session nobody changed: reading it again gives the same initial value. Unless a
                # NaN or infinity encoded as one of its nulls (a ratio set to nan where the default is None).
                if "null" in data:
                    config.check_finite(self.key, self._value)
                return
            config.check(self.key, data, self._value)  # only what is written: the rest was read as valid
            await self._tx.write(self.key, StoredSession(data, config.version), config.ttl)
