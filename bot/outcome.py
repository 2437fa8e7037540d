"""What became of an update or a timer's fire: its `Status`, and the calls to send after the commit."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .storage import PendingCall

__all__ = ["DONE", "Outcome", "Status"]


class Status(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # a redelivery: nothing applied again, unconfirmed replies sent again
    IGNORED = "ignored"  # no handler for this update: no database work at all
    FAILED = "failed"  # a handler raised and the error hook handled it: the hook's effects committed
    DEAD_LETTER = "dead_letter"  # failed for good: rolled back, recorded as a dead letter, acknowledged


# Outcomes after which a redelivery has nothing left to do: applied (or handled by the error hook), or
# recorded as a dead letter.
DONE = frozenset((Status.APPLIED, Status.FAILED, Status.DEAD_LETTER))


@dataclass(slots=True)
class Outcome:
    """Not changed once made; not a frozen dataclass, which costs several times as much to build (each
    field set through object.__setattr__), for every update."""

    status: Status
    to_send: list[PendingCall] = field(default_factory=list)
