"""CPU of the session layer's steps for the pizza bot's session, with no storage: what checking a value on
save costs beside what encoding and reading it cost.

    .venv/bin/python bench/session_cost.py          # best of 9 rounds of 200000 calls each

Per update, a session is read (decoded, then encoded again to compare with at save) and encoded at save;
only a session that changed is checked (read back as its type) and written. The baseline line is the read
as it was before the decoder was built once per session: `msgspec.json.decode(data, type=...)`.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

import msgspec

from bot.apps.pizza import PizzaSession
from bot.session import session
from bot.storage import StoredSession

CALLS = 200_000
ROUNDS = 9


def best(call: Callable[[], object]) -> float:
    return min(timeit.repeat(call, number=CALLS, repeat=ROUNDS)) / CALLS * 1e9


def main() -> None:
    config = session(initial=PizzaSession)
    value = PizzaSession(41)
    data = config.encode("-1", value)
    stored = StoredSession(data)
    figures = {
        "encode (every update that loads the session, twice)": best(lambda: config.encode("-1", value)),
        "check (only a session that is written)": best(lambda: config.check("-1", data, value)),
        "read (every update that loads the session)": best(lambda: config.decode("-1", stored)),
        "baseline read, msgspec.json.decode(type=...)": best(
            lambda: msgspec.json.decode(data, type=PizzaSession)
        ),
    }
    for name, ns in figures.items():
        print(f"{ns:6.0f} ns  {name}")


if __name__ == "__main__":
    main()
