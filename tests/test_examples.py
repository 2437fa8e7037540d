"""The three versions of the pizza bot in docs/SESSIONS.md behave alike, on both storages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from bot.context import BotIdentity
from bot.metrics import Metrics
from bot.pipeline import Pipeline
from bot.storage import Storage
from bot.telegram import decode_update
from bot.testing.updates import PIZZA, encode, hunger, message_update

pytestmark = pytest.mark.anyio

EXAMPLES = sorted((Path(__file__).parent.parent / "docs" / "examples").glob("pizza_*.py"))


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


def test_there_are_three_examples() -> None:
    assert [p.stem for p in EXAMPLES] == ["pizza_initial", "pizza_lazy", "pizza_minimal"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
async def test_every_example_counts_pizzas_per_chat(storage: Storage, path: Path) -> None:
    run = Pipeline(load(path).build_bot(), storage, BotIdentity(1, "pizza_bot"), Metrics())
    updates = [
        hunger(1, -1),
        message_update(2, -1, PIZZA),
        message_update(3, -1, f"{PIZZA}{PIZZA}"),
        message_update(4, -2, PIZZA),
        message_update(5, -1, "no pizza"),
        hunger(6, -1),
    ]
    replies = []
    for raw in updates:
        replies += [c.params["text"] for c in (await run.process(decode_update(encode(raw)))).to_send]
    assert replies == ["Your hunger level is 0!", "Your hunger level is 2!"]
