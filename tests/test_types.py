"""bot/types.py, bot/methods.py and bot/kinds.py against the vendored Bot API schema: every type, field,
method and update kind is there, and updates of every kind, generated from the schema itself, decode,
reach their handler, and re-encode to the JSON they came from."""

from __future__ import annotations

import json
import random
import typing
from typing import Any, get_type_hints

import msgspec
import pytest

import bot.types
from bot._gen.generate import ARRAY, find_tags, load, render, snake
from bot.context import BotIdentity, Context
from bot.dispatch import Bot
from bot.kinds import KindAccessors, KindRoutes
from bot.methods import METHODS, ApiMethods, OutboxMethods
from bot.metrics import Metrics
from bot.pipeline import Pipeline, Status
from bot.router import EDITED, MESSAGE
from bot.storage.memory import MemoryStorage
from bot.telegram import decode_update
from bot.types import UPDATE_KINDS, Update
from bot.updates import MESSAGE_KINDS

pytestmark = pytest.mark.anyio

SCHEMA = load()
TAGS, UNIONS = find_tags(SCHEMA)
UPDATES_PER_KIND = 1000
FUTURE = "x_future_"  # the prefix of the fields no Bot API version has, added to the samples


# --- the generated modules are the schema's --------------------------------------------------------


def test_regenerating_changes_nothing() -> None:
    for path, text in render(SCHEMA).items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name}: run `python -m bot._gen.generate`"


def test_every_type_of_the_schema_is_in_bot_types_with_its_fields() -> None:
    generated = {name for name in bot.types.__all__ if name not in ("Int64", "TelegramType", "UPDATE_KINDS")}
    assert generated == set(SCHEMA.types)
    assert len(generated) == 359
    for entity in SCHEMA.types.values():
        cls = getattr(bot.types, entity.name)
        if entity.subtypes or entity.name == "InputFile":
            continue  # a union alias; InputFile is bot/files.py's
        info = msgspec.structs.fields(cls)
        encoded = {f.encode_name: f.required for f in info}
        tag = TAGS.get(entity.name)
        expected = {f.name: f.required for f in entity.fields if tag is None or f.name != tag.field}
        assert encoded == expected, entity.name
        if tag is not None:  # the tag field is the class's tag, and readable as an attribute
            assert getattr(cls, tag.field) == tag.value == cls.__struct_config__.tag


def test_every_union_the_api_tags_is_a_tagged_union() -> None:
    tagged = {name for name, field in UNIONS.items() if field is not None}
    assert {"MessageOrigin", "ChatMember", "InlineQueryResult", "BotCommandScope", "ReactionType"} <= tagged
    assert UNIONS["ChatMember"] == "status"
    member = msgspec.json.decode(
        b'{"status": "left", "user": {"id": 1, "is_bot": false, "first_name": "A"}}',
        type=bot.types.ChatMember,
    )
    assert isinstance(member, bot.types.ChatMemberLeft) and member.status == "left"
    # Not tagged by the API, and never received: only ever encoded.
    assert {name for name, field in UNIONS.items() if field is None} == {
        "MaybeInaccessibleMessage",  # received, and decoded as Message (an inaccessible one has date 0)
        "InputMessageContent",
    }


def test_every_method_is_typed_now_and_queued_with_its_parameters() -> None:
    assert list(METHODS) == list(SCHEMA.methods)
    assert len(METHODS) == 180
    for method in SCHEMA.methods.values():
        name = snake(method.name)
        assert METHODS[method.name] == name
        assert callable(getattr(ApiMethods, name)) and callable(getattr(OutboxMethods, name))
        if not method.fields:
            continue
        params = getattr(bot.methods, f"{method.name[0].upper()}{method.name[1:]}Params")
        assert set(params.__annotations__) == {f.name for f in method.fields}, method.name
        hints = get_type_hints(params, vars(bot.methods), include_extras=True)
        required = {name for name, hint in hints.items() if typing.get_origin(hint) is typing.Required}
        assert required == {f.name for f in method.fields if f.required}, method.name


def received_types() -> set[str]:
    """The types Telegram sends: reachable from Update and from every method's result."""
    seen: set[str] = set()
    todo = [
        "Update",
        *(r.removeprefix(ARRAY).removeprefix(ARRAY) for m in SCHEMA.methods.values() for r in m.returns),
    ]
    while todo:
        name = todo.pop()
        if name in seen or name not in SCHEMA.types:
            continue
        seen.add(name)
        entity = SCHEMA.types[name]
        todo += [s.removeprefix(ARRAY) for s in entity.subtypes]
        todo += [t.removeprefix(ARRAY).removeprefix(ARRAY) for f in entity.fields for t in f.types]
    return seen


def test_every_type_telegram_sends_has_a_decoder() -> None:
    received = received_types()
    assert len(received) > 250
    for name in received:
        msgspec.json.Decoder(getattr(bot.types, name))  # raises for an untagged union of objects


def test_the_kinds_are_update_s_fields_with_a_decorator_and_an_accessor_each() -> None:
    kinds = [f.name for f in SCHEMA.update_kinds]
    assert list(UPDATE_KINDS) == kinds
    assert Update.__struct_fields__ == ("update_id", *kinds)  # what Update.kind walks
    assert {"inline_query", "poll_answer", "pre_checkout_query", "chat_boost", "purchased_paid_media"} <= set(
        kinds
    )
    for kind in kinds:
        assert callable(getattr(KindRoutes, kind))
        assert isinstance(getattr(KindAccessors, kind), property)
    asking: Bot[None] = Bot()
    asking.poll_answer()(noop)
    asking.inline_query()(noop)
    assert asking.allowed_updates() == ["inline_query", "poll_answer"]  # in the API's order


async def noop(ctx: Context[None]) -> None:
    pass


def test_what_an_update_is_about_is_found_for_every_kind_the_schema_has() -> None:
    """bot/updates.py lists the Message kinds by hand and finds `chat` and the sender by field name: a
    new Bot API version whose kinds break either assumption fails here."""
    kinds = {f.name: f.types[0] for f in SCHEMA.update_kinds}
    assert set(MESSAGE_KINDS) == {k for k, t in kinds.items() if t == "Message"}
    for kind, type_name in kinds.items():
        fields = {f.name: f.types for f in SCHEMA.types[type_name].fields}
        assert fields.get("chat", ("Chat",)) == ("Chat",), kind
        assert fields.get("from", ("User",)) == ("User",), kind
        assert fields.get("user", ("User",)) == ("User",), kind


def test_structs_are_frozen_and_leave_absent_fields_out() -> None:
    user = bot.types.User(id=1, is_bot=False, first_name="Ann", language_code="en")
    assert msgspec.json.decode(msgspec.json.encode(user)) == {
        "id": 1,
        "is_bot": False,
        "first_name": "Ann",
        "language_code": "en",
    }
    with pytest.raises(AttributeError):
        user.first_name = "Bob"  # type: ignore[misc]
    hints = get_type_hints(bot.types.Message, include_extras=False)
    assert hints["from_user"] == bot.types.User | None
    assert typing.get_args(hints["entities"]) == (list[bot.types.MessageEntity], type(None))


# --- updates of every kind, generated from the schema ----------------------------------------------

# Fields that make a message a service message of its own kind, tested apart: a chat migration in a
# random chat is one Telegram never sends, and is refused (tests/test_rules.py).
SERVICE_FIELDS = {"Message": ("migrate_to_chat_id", "migrate_from_chat_id")}
STRINGS = [
    "",
    "hello",
    "🍕",
    "Ünïcödé ümlauts",
    'quote " and \\ backslash',
    "line\nbreak",
    "\u2028",
    "/start",
]


class Samples:
    """Valid JSON values of the schema's types, seeded: required fields always, optional ones now and then
    (less often deeper down), and fields from a future Bot API version sprinkled in."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def of(self, types: tuple[str, ...], depth: int) -> Any:
        return self.one(self.rng.choice(types), depth)

    def one(self, name: str, depth: int, *, in_array_of: str = "") -> Any:
        assert depth < 40, f"{name}: the schema has a cycle of required fields"
        rng = self.rng
        if name.startswith(ARRAY):
            item = name.removeprefix(ARRAY)
            return [
                self.one(item, depth + 1, in_array_of=item)
                for _ in range(rng.randint(0, 2 if depth < 4 else 0))
            ]
        if name == "Integer":
            return rng.choice([0, rng.randint(-1000, 1000), rng.randint(-(2**52), 2**52), 2**63 - 1])
        if name == "Float":
            return round(rng.uniform(-180, 180), rng.randint(0, 8))
        if name in ("Boolean", "True"):
            return True if name == "True" else rng.random() < 0.5
        if name == "String":
            return rng.choice(STRINGS)
        entity = SCHEMA.types[name]
        if entity.subtypes:
            # An array directly inside an array of the same union is left out: decoded, it stays plain
            # JSON (bot/types.py's RichText), where the future fields would stay too.
            members = [m for m in entity.subtypes if not (in_array_of == name and m.startswith(ARRAY))]
            if depth > 4 and "String" in members:
                return self.one("String", depth)
            return self.one(rng.choice(members), depth)
        chance = (0.3, 0.3, 0.12, 0.05, 0.02)[depth] if depth < 5 else 0.0
        obj: dict[str, Any] = {}
        tag = TAGS.get(name)
        for field in entity.fields:
            if field.name in SERVICE_FIELDS.get(name, ()):
                continue
            if tag is not None and field.name == tag.field:
                obj[field.name] = tag.value
            elif field.required or rng.random() < chance:
                obj[field.name] = self.of(field.types, depth + 1)
        if rng.random() < 0.15:
            obj[f"{FUTURE}{rng.randint(0, 9)}"] = rng.choice(
                [1, "new", [1, {"a": None}], {"nested": {"b": 2.5}}]
            )
        return obj

    def update(self, update_id: int, kind: str) -> dict[str, Any]:
        kind_type = next(f.types for f in SCHEMA.update_kinds if f.name == kind)
        update = {"update_id": update_id, kind: self.of(kind_type, 1)}
        if self.rng.random() < 0.1:
            update[f"{FUTURE}kind"] = {"id": "1"}
        return update


def modelled(value: Any) -> Any:
    """The JSON without the fields no Bot API version models: what the types themselves re-encode to."""
    if isinstance(value, dict):
        return {k: modelled(v) for k, v in value.items() if not k.startswith(FUTURE)}
    if isinstance(value, list):
        return [modelled(v) for v in value]
    return value


def test_every_type_telegram_sends_round_trips_through_its_struct() -> None:
    samples = Samples(seed=7)
    for name in sorted(received_types()):
        cls = getattr(bot.types, name)
        for _ in range(20):
            value = samples.one(name, 1)
            decoded = msgspec.json.decode(json.dumps(value, ensure_ascii=False).encode(), type=cls)
            assert msgspec.to_builtins(decoded) == modelled(value), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", UPDATE_KINDS)
async def test_a_thousand_updates_of_every_kind_decode_reach_their_handler_and_re_encode(kind: str) -> None:
    bot_: Bot[None] = Bot()
    reached: list[tuple[str, Any]] = []
    for registered in UPDATE_KINDS:  # one handler per kind, each through its own decorator

        def handler(registered: str = registered) -> Any:
            async def handle(ctx: Context[None]) -> None:
                reached.append((registered, getattr(ctx, ctx.update.kind or "")))

            return handle

        getattr(bot_, registered)()(handler())
    pipeline = Pipeline(bot_, MemoryStorage(), BotIdentity(1, "test_bot"), Metrics())
    samples = Samples(seed=UPDATE_KINDS.index(kind))
    for update_id in range(1, UPDATES_PER_KIND + 1):
        sent = samples.update(update_id, kind)
        body = json.dumps(sent, ensure_ascii=False).encode()
        update = decode_update(body)
        assert update.kind == kind
        outcome = await pipeline.process(update)
        assert outcome.status is Status.APPLIED
        handled_by, seen = reached.pop()
        # `message` and `edited_message` also take channel posts (registered first, they win them).
        assert kind in {"message": MESSAGE, "edited_message": EDITED}.get(handled_by, (handled_by,))
        assert seen is update.event is getattr(update, kind)
        assert msgspec.to_builtins(update) == modelled(sent)  # every field we model, as sent
        assert msgspec.json.decode(update.raw) == update.json() == sent  # and the rest kept
    assert not reached


def test_raw_json_of_an_update_built_in_code_is_its_fields() -> None:
    answer = bot.types.PollAnswer(poll_id="p", option_ids=[0], option_persistent_ids=["a"])
    update = Update(update_id=5, poll_answer=answer)
    assert update.json() == {
        "update_id": 5,
        "poll_answer": {"poll_id": "p", "option_ids": [0], "option_persistent_ids": ["a"]},
    }
