"""Dialogs: multi-step conversations as states kept in a session, after aiogram's FSM (`StatesGroup`,
`State`, `FSMContext`), with a timeout built on durable timers.

    class Signup(StatesGroup):
        name = State()
        age = State()

    signup = Dialog(Signup, data_type=Form, key=chat_user_key, timeout=600)

    @signup.message(Signup.name, text())      # only while this person is at that step
    async def got_name(ctx): ...

A dialog is a router whose handlers may be filtered by state, and a lazy session (one per scope: chat,
person, or person in a chat) holding the current state and the dialog's data. The state is read, with the
session's row lock, when a handler filtered by state is about to run, and written back in the update's
transaction: a redelivered answer stops at its claim and never advances the dialog twice, and two
answers sent at once take turns on the lock, the second seeing the step the first moved to. Every step
(re)arms the timeout, a timer of the same transaction, so a dialog left unanswered ends even if every
process restarted in between.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar, Generic, TypeVar, cast

import msgspec

from .context import Context
from .errors import BotError
from .filters import Check
from .router import Router, SkipHandler
from .session import SessionConfig, chat_user_key, session
from .telegram import Update

__all__ = ["Dialog", "DialogState", "NoDialog", "State", "StatesGroup", "any_step"]

D = TypeVar("D")
H = TypeVar("H", bound=Callable[..., Awaitable[None]])

# The timer name of a dialog's timeout, under the dialog's session key.
TIMEOUT = "timeout"


class NoDialog(BotError, LookupError):
    """The dialog's data was asked for where no dialog of its kind is in progress."""


class State:
    """One step of a dialog, declared as an attribute of a `StatesGroup`; stored as "Group:attribute"."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.name = f"{owner.__name__}:{attribute}"

    def __repr__(self) -> str:
        return f"<State {self.name!r}>"

    def __call__(self, ctx: Context[Any]) -> bool:
        # Reached only when a State is given to a plain router, where no dialog session is loaded.
        raise TypeError(f"{self!r} filters only the handlers of its Dialog: register them on the dialog")


# A filter for any step of the handler's dialog: the dialog is in progress, wherever it is.
any_step = State("*")


class StatesGroup:
    """The steps of one dialog, as `State()` class attributes, in the order they are declared."""

    states: ClassVar[tuple[State, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.states = tuple(value for value in vars(cls).values() if isinstance(value, State))


class _Stored(msgspec.Struct, Generic[D]):
    """A dialog in progress, as its session stores it. No row: no dialog."""

    state: str
    data: D


class DialogState(Generic[D]):
    """One scope's dialog in this update (aiogram's FSMContext): changes commit with the update."""

    def __init__(self, dialog: Dialog[D], ctx: Context[Any]) -> None:
        self._dialog = dialog
        self._ctx = ctx

    @property
    def _stored(self) -> _Stored[D] | None:
        stored: _Stored[D] | None = self._ctx.fragment(self._dialog.session_name)
        return stored

    @property
    def current(self) -> State | None:
        """The step this scope is at; None when no dialog is in progress."""
        stored = self._stored
        return None if stored is None else self._dialog.states_by_name.get(stored.state)

    @property
    def active(self) -> bool:
        return self.current is not None

    @property
    def data(self) -> D:
        """The dialog's data, kept from step to step; change it in place."""
        stored = self._stored
        if stored is None:
            raise NoDialog(f"no {self._dialog.name} dialog is in progress here: enter() it first")
        return stored.data

    def set(self, state: State, data: D | None = None) -> None:
        """Move to `state` (entering the dialog, with fresh data, if none is in progress) and restart the
        timeout. `data` replaces the dialog's data."""
        if state.name not in self._dialog.states_by_name:
            raise ValueError(f"{state!r} is not a step of {self._dialog.name}")
        stored = self._stored
        if data is None:
            data = self._dialog.data_type() if stored is None else stored.data
        self._ctx.set_fragment(self._dialog.session_name, _Stored(state.name, data))
        if self._dialog.timeout is not None:
            self._ctx.schedule(
                self._dialog.timer_handler, after=self._dialog.timeout, name=TIMEOUT, key=self._timer_key()
            )

    def clear(self) -> None:
        """End the dialog: its state and data are deleted, its timeout cancelled."""
        if self._stored is not None:
            self._ctx.set_fragment(self._dialog.session_name, None)
            if self._dialog.timeout is not None:
                self._ctx.cancel(TIMEOUT, key=self._timer_key())

    def _timer_key(self) -> str:
        key = self._dialog.config.key(self._ctx.update)
        assert key is not None  # the session was loaded, so it has a key
        return key


class Dialog(Router[Any], Generic[D]):
    """The handlers and the state of one multi-step dialog; include it into the bot
    (`bot.include_router(dialog)`), which then keeps its session and fires its timeout.

    `states`: the StatesGroup of its steps. `data_type`: the dialog's data, a dataclass or msgspec
    Struct built with no arguments when the dialog is entered (default: a dict). `key`: whose dialog it
    is: `chat_user_key` (default: each person in each chat has their own), `chat_key` (one for the whole
    chat), `user_key` (one per person, across chats), or any key function. `timeout`: seconds without a
    step after which the dialog ends, calling the `on_timeout` handler first.

    Handlers registered on it take State filters besides the usual ones: the handler runs only while
    the dialog is at one of those steps (`any_step`: at any).
    """

    def __init__(
        self,
        states: type[StatesGroup],
        data_type: type[D] | None = None,
        *,
        key: Callable[[Update], str | None] = chat_user_key,
        timeout: float | None = None,
        name: str | None = None,
    ) -> None:
        name = name or states.__name__
        super().__init__(name)  # the router's name is the dialog's
        if not states.states:
            raise ValueError(f"{states.__name__} declares no State() attributes")
        if timeout is not None and not timeout > 0:
            raise ValueError(
                f"dialog {self.name}: timeout must be a positive number of seconds, not {timeout!r}"
            )
        self.states_by_name = {state.name: state for state in states.states}
        self.data_type: Callable[[], D] = data_type or cast(Callable[[], D], dict)
        self.timeout = timeout
        self.session_name = f"dialog:{name}"
        self.timer_handler = f"dialog:{name}"
        stored_type: type[_Stored[D]] = cast(Any, _Stored)[data_type or dict[str, Any]]
        self.config: SessionConfig[_Stored[D]] = session(
            data_type=stored_type, get_session_key=key, prefix=f"dialog:{name}:", lazy=True
        )
        self._on_timeout: Callable[[Context[Any]], Awaitable[None]] | None = None

    async def state(self, ctx: Context[Any]) -> DialogState[D]:
        """This scope's dialog, loaded (and its row locked) if it was not yet in this update."""
        await ctx.get_session(self.session_name)
        return DialogState(self, ctx)

    async def enter(self, ctx: Context[Any], state: State, data: D | None = None) -> DialogState[D]:
        """Start the dialog at `state` with fresh data (or `data`), ending any one in progress."""
        dialog = await self.state(ctx)
        dialog.set(state, data if data is not None else self.data_type())
        return dialog

    def on_timeout(self, handler: H) -> H:
        """Register `async def handler(ctx)`, run when the dialog times out, before it ends (`ctx.timer`
        says how late; the dialog's state and data are still there). Moving the dialog to a step there
        keeps it going. Usable as a decorator."""
        self._on_timeout = handler
        return handler

    async def timed_out(self, ctx: Context[Any]) -> None:
        """The timeout's timer handler: the bot registers it when the dialog is included."""
        dialog = await self.state(ctx)
        before = ctx.fragment(self.session_name)
        if before is None:
            return  # ended meanwhile: a cancel commits its timer's removal with it, so only by hand
        if self._on_timeout is not None and dialog.active:  # (not at a step this code no longer has)
            await self._on_timeout(ctx)
        if ctx.fragment(self.session_name) is before:
            dialog.clear()

    def on(self, kinds: str | Iterable[str], *filters: Check) -> Callable[[H], H]:
        """As `Router.on`; State filters (several: any of them; `any_step`: any) say at which steps of
        this dialog the handler runs. Without one it runs whatever the state, as in aiogram."""
        states = {f.name for f in filters if isinstance(f, State)}
        if any_step.name in states:
            states = set(self.states_by_name)
        register = super().on(kinds, *(f for f in filters if not isinstance(f, State)))
        if not states:
            return register
        unknown = states - set(self.states_by_name)
        if unknown:
            raise ValueError(f"dialog {self.name}: {sorted(unknown)} are not its steps")

        def decorate(handler: H) -> H:
            @functools.wraps(handler)
            async def in_state(ctx: Context[Any]) -> None:
                if self.config.key(ctx.update) is None:
                    raise SkipHandler  # nobody's dialog: no scope (say, a channel post for a per-user one)
                stored: _Stored[D] | None = await ctx.get_session(self.session_name)
                if stored is None or stored.state not in states:
                    raise SkipHandler
                await handler(ctx)

            register(in_state)
            return handler

        return decorate
