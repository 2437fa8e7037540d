"""`bot/types.py`'s text: every type of the Bot API as a frozen msgspec Struct, and every union as an
alias of its members, tagged by the field the API names."""

from __future__ import annotations

from .schema import Schema, find_tags
from .source import (
    DECODED_AS,
    PRIMITIVES,
    Annotations,
    docstring,
    field_doc,
    isort_key,
    preamble,
    py_name,
    wrap_alias,
)

__all__ = ["render_types"]


def render_types(schema: Schema) -> str:
    tags, unions = find_tags(schema)
    names = Annotations(schema, primitives=PRIMITIVES, array="list")
    out = [
        *preamble(
            schema,
            f"Every type of the Telegram {schema.version} ({schema.release_date}), as msgspec Structs.\n\n"
            "Decoding checks the shape; fields this version does not know are skipped here and kept in the\n"
            "update's raw JSON (`Update.raw`, `Update.json()`). Optional fields are None when absent, so\n"
            "encoding a decoded object gives back the fields it was sent with. `from` is `from_user`.",
        ),
        "from typing import Annotated, ClassVar, Literal, TypeAlias",
        "",
        "import msgspec",
        "",
        "from .files import InputFile",
        "from .updates import UpdateMixin",
        "",
        "__all__ = [",
        *[
            f'    "{n}",'
            for n in sorted([*schema.types, "Int64", "TelegramType", "UPDATE_KINDS"], key=isort_key)
        ],
        "]",
        "",
        "# Telegram's integers are signed 64-bit (chat ids reach 52 bits); a bigger number cannot be a real",
        "# one and would overflow PostgreSQL's bigint, so it is rejected at the door.",
        "Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]",
        "",
        "# Every field of Update but update_id, in the API's order: Telegram sends exactly one per update.",
        "UPDATE_KINDS = (",
        *[f'    "{f.name}",' for f in schema.update_kinds],
        ")",
        "",
        "",
        "class TelegramType(msgspec.Struct, frozen=True, omit_defaults=True):",
        '    """Base of every Bot API type: immutable, built with keywords, optional fields left out of the',
        '    JSON when None."""',
    ]
    for entity in schema.types.values():
        if entity.subtypes or entity.name == "InputFile":
            continue  # unions are aliases, below; InputFile is bot/files.py's
        # frozen again for mypy, which does not inherit it; kw_only again for msgspec, likewise.
        bases = ["TelegramType", "frozen=True", "kw_only=True"]
        if entity.name == "Update":
            bases = [
                "UpdateMixin",
                "TelegramType",
                "frozen=True",
                "kw_only=True",
                "dict=True",
            ]  # dict: room for the raw body
        tag = tags.get(entity.name)
        if tag is not None:
            bases += [f'tag_field="{tag.field}"', f'tag="{tag.value}"']
        out += ["", "", f"class {entity.name}({', '.join(bases)}):"]
        out += docstring(f"{entity.description}\n\n{entity.href}", "    ")
        body: list[str] = []
        for field in entity.fields:
            if tag is not None and field.name == tag.field:
                body.append(f'    {field.name}: ClassVar[Literal["{tag.value}"]] = "{tag.value}"')
                body += docstring(field_doc(field), "    ")
                continue
            # A field that may name a file of the same request ("attach://<name>") takes the file itself:
            # bot/files.py uploads it under a name of its own and writes that reference in its place.
            attaches = "attach://" in field.description and field.types == ("String",)
            annotation = "InputFile | str" if attaches else names.union(field.types)
            rename = ', name="from"' if field.name == "from" else ""
            if field.required:
                default = f" = msgspec.field({rename[2:]})" if rename else ""
            else:
                annotation += " | None"
                default = f" = msgspec.field(default=None{rename})" if rename else " = None"
            body.append(f"    {py_name(field)}: {annotation}{default}")
            body += docstring(field_doc(field), "    ")
        if body:
            out += ["", *body]
    out += ["", "", "# Unions: one of several types, told apart by the tag field the API names."]
    for union, tag_field in unions.items():
        entity = schema.types[union]
        out.append("")
        if union in DECODED_AS:
            out.append("# Message or InaccessibleMessage (date 0), told apart by `date`: decoded as Message.")
            out.append(f"{union}: TypeAlias = {DECODED_AS[union]}")
            continue
        if tag_field is None:
            out.append("# Not tagged by the API: only ever sent, never decoded.")
        members = [names.one(s) for s in entity.subtypes]
        if f"list[{union}]" in members:
            # msgspec cannot resolve a recursive alias on Python 3.11: an array holds the other members,
            # typed, and an array directly inside it stays plain JSON.
            parts = [m for m in members if m != f"list[{union}]"]
            out += [
                f"# {union}'s members, and an array of them, inside an array.",
                *wrap_alias(f"_{union}Part", [*parts, "list[object]"]),
                "",
            ]
            members = [f"list[_{union}Part]" if m == f"list[{union}]" else m for m in members]
        out += wrap_alias(union, members)
    return "\n".join(out) + "\n"
