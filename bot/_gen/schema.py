"""The Bot API as `api.json` describes it, read into `Schema`: each type and method with its fields, and
each union's tag (the field whose fixed value tells its members apart), found in the fields' prose."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ARRAY", "SCHEMA", "Entity", "Field", "Schema", "Tag", "find_tags", "load"]

HERE = Path(__file__).parent
SCHEMA = HERE / "api.json"

# The tag of a union's member: "Type of the message origin, always “user”", "Scope type, must be default".
TAG = re.compile(r"(?:always|must be) [\"“]?([a-z_]+)[\"”]?")

ARRAY = "Array of "


@dataclass(frozen=True)
class Field:
    name: str
    types: tuple[str, ...]
    required: bool
    description: str


@dataclass(frozen=True)
class Entity:
    """A type or a method of the Bot API."""

    name: str
    href: str
    description: str
    fields: tuple[Field, ...]
    subtypes: tuple[str, ...] = ()
    returns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Schema:
    version: str
    release_date: str
    types: dict[str, Entity]
    methods: dict[str, Entity]

    @property
    def update_kinds(self) -> list[Field]:
        return [f for f in self.types["Update"].fields if f.name != "update_id"]


def load(path: Path = SCHEMA) -> Schema:
    raw = json.loads(path.read_text(encoding="utf-8"))

    def entity(item: dict[str, Any]) -> Entity:
        return Entity(
            name=item["name"],
            href=item["href"],
            description="\n".join(item.get("description", [])),
            fields=tuple(
                Field(f["name"], tuple(f["types"]), f["required"], f["description"])
                for f in item.get("fields", [])
            ),
            subtypes=tuple(item.get("subtypes", [])),
            returns=tuple(item.get("returns", [])),
        )

    return Schema(
        version=raw["version"],
        release_date=raw["release_date"],
        types={name: entity(item) for name, item in raw["types"].items()},
        methods={name: entity(item) for name, item in raw["methods"].items()},
    )


@dataclass(frozen=True)
class Tag:
    field: str
    value: str


def find_tags(schema: Schema) -> tuple[dict[str, Tag], dict[str, str | None]]:
    """Each union member's tag, and each union's tag field (None: the API does not tag it)."""
    tags: dict[str, Tag] = {}
    unions: dict[str, str | None] = {}
    for union in schema.types.values():
        if not union.subtypes:
            continue
        members = [schema.types[s] for s in union.subtypes if s in schema.types]
        found: dict[str, list[str]] = {}
        for candidate in members[0].fields:
            values = []
            for member in members:
                field = next((f for f in member.fields if f.name == candidate.name), None)
                match = TAG.search(field.description) if field is not None else None
                if match is None:
                    break
                values.append(match.group(1))
            else:
                found[candidate.name] = values
        if len(found) > 1:
            raise ValueError(f"{union.name}: more than one tag field: {sorted(found)}")
        unions[union.name] = next(iter(found), None)
        for tag_field, values in found.items():
            for member, value in zip(members, values, strict=True):
                tag = Tag(tag_field, value)
                if tags.setdefault(member.name, tag) != tag:
                    raise ValueError(f"{member.name} is tagged {tags[member.name]} and {tag}")
    return tags, unions
