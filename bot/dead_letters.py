"""`python -m bot dead-letters` and `python -m bot replay`: what failed for good, and running it again.

An update whose handling failed deterministically (docs/RELIABILITY.md) was rolled back, claimed and
recorded with the update as received, the error and its traceback. Once the code is fixed, `replay` runs
it through the pipeline again, with locks: the transaction that applies it also deletes its dead letter,
so a replay racing another replay, or a redelivery, applies it once. One that fails again stays listed,
with one more attempt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .failures import TryLater
from .pipeline import Outcome, Pipeline, Status
from .storage import DeadLetter, PendingCall

__all__ = ["Replayed", "describe_letter", "replay_all", "table"]

_COLUMNS = ("UPDATE", "CHAT", "KIND", "ATTEMPTS", "FAILED (UTC)", "ERROR")


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def table(letters: Sequence[DeadLetter], width: int = 160) -> str:
    """The dead letters, one line each, the error cut to fit `width` characters."""
    if not letters:
        return "no dead letters"
    rows = [
        (str(d.update_id), d.chat or "-", d.kind or "-", str(d.attempts), _when(d.failed_at), d.error)
        for d in letters
    ]
    widths = [max(len(row[n]) for row in [_COLUMNS, *rows]) for n in range(len(_COLUMNS) - 1)]
    lines = []
    for row in [_COLUMNS, *rows]:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        lines.append(line if len(line) <= width else line[: width - 1] + "…")
    return "\n".join(lines)


def describe_letter(letter: DeadLetter) -> str:
    """One dead letter in full: what `python -m bot dead-letters UPDATE_ID` prints."""
    return (
        f"update {letter.update_id} (chat {letter.chat or '-'}, {letter.kind or 'unrouted kind'}),"
        f" {letter.attempts} attempt(s), last failed {_when(letter.failed_at)} UTC\n"
        f"error: {letter.error}\n\nupdate as received:\n{letter.body}\n\n{letter.traceback.rstrip()}"
    )


@dataclass(frozen=True)
class Replayed:
    update_id: int
    status: Status | None  # None: not run now (the database or Telegram away)
    to_send: list[PendingCall]
    note: str  # what happened, in words

    @property
    def done(self) -> bool:
        """No longer a dead letter: applied, handled by the error hook, or replayed by someone else."""
        return self.status is not None and self.status is not Status.DEAD_LETTER


_SAID = {
    Status.APPLIED: "applied",
    Status.IGNORED: "no handler wants it now: removed from the dead letters",
    Status.FAILED: "failed again, and the error hook handled it: removed from the dead letters",
    Status.DUPLICATE: "replayed meanwhile by someone else: nothing done",
    Status.DEAD_LETTER: "failed again: still a dead letter",
}


async def replay_all(pipeline: Pipeline, letters: Sequence[DeadLetter]) -> list[Replayed]:
    """Replay each letter in turn (oldest first, as they are listed): a chat's updates keep their order."""
    done = []
    for letter in letters:
        try:
            outcome: Outcome = await pipeline.replay(letter)
        except TryLater as exc:
            done.append(Replayed(letter.update_id, None, [], f"not replayed now: {exc}"))
            continue
        done.append(Replayed(letter.update_id, outcome.status, outcome.to_send, _SAID[outcome.status]))
    return done
