"""The playground: a chat client in the browser (and `python -m bot chat`) for trying a bot locally.

Its messages go to the bot as real updates through `POST /webhook`, and the bot's replies come back
through the outbox to a Bot API stand-in inside the process; see `routes.py` and `stand_in.py`.
"""

from __future__ import annotations

from .routes import Playground

__all__ = ["Playground"]
