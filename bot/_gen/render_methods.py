"""`bot/methods.py`'s text: every method's parameters as a TypedDict, and the two mixins that spell every
method by its snake_case name, `ApiMethods` (called now) and `OutboxMethods` (queued)."""

from __future__ import annotations

from .schema import Entity, Schema
from .source import PARAM_PRIMITIVES, WIDTH, Annotations, docstring, field_doc, preamble, snake

__all__ = ["render_methods"]


def render_methods(schema: Schema) -> str:
    params = Annotations(schema, primitives=PARAM_PRIMITIVES, array="Sequence")
    unions = {name for name, entity in schema.types.items() if entity.subtypes}
    results = Annotations(schema, primitives=PARAM_PRIMITIVES, array="list")
    head = [
        *preamble(
            schema,
            f"Every method of the Telegram {schema.version}: its parameters, and two ways to call it.\n\n"
            "`ApiMethods` calls it now and decodes the result (`await ctx.api.send_photo(...)`); `OutboxMethods`\n"
            "queues it to be sent after the update's transaction commits (`ctx.outbox.send_photo(...)`). Both\n"
            "take the parameters as keywords, typed by the method's TypedDict.",
        ),
        "from abc import ABC, abstractmethod",
        "from collections.abc import Sequence",
        "from typing import Any, Generic, Required, TypedDict, TypeVar, Unpack",
        "",
        "import msgspec",
        "",
    ]
    out = [
        '__all__ = ["METHODS", "ApiMethods", "OutboxMethods"]',
        "",
        'R = TypeVar("R")',
        "",
        "# Bot API name → snake_case name, in the API's order.",
        "METHODS = {",
        *[f'    "{m}": "{snake(m)}",' for m in schema.methods],
        "}",
    ]
    for method in schema.methods.values():
        if not method.fields:
            continue
        out += ["", "", f"class {method.name[0].upper()}{method.name[1:]}Params(TypedDict, total=False):"]
        out.append(f'    """{method.name}\'s parameters: {method.href}"""')
        out.append("")
        for field in method.fields:
            annotation = params.union(field.types)
            if field.required:
                annotation = f"Required[{annotation}]"
            out.append(f"    {field.name}: {annotation}")
            out += docstring(field_doc(field), "    ")
    out += [
        "",
        "",
        "class ApiMethods(ABC):",
        '    """Every Bot API method, called now; the result decoded into bot.types."""',
        "",
        "    @abstractmethod",
        "    async def call(self, method: str, **params: Any) -> Any:",
        '        """Call `method` with these parameters; return the result as JSON values."""',
    ]
    for method in schema.methods.values():
        result = results.union(method.returns)
        out += ["", *signature(method, "    async def", result)]
        out += docstring(f"{method.description}\n\n{method.href}", "        ")
        args = f'"{method.name}", **params' if method.fields else f'"{method.name}"'
        if "|" in result or result in unions:  # convert() is typed for a class, not a union: name the type
            out.append(f"        result: {result} = msgspec.convert(await self.call({args}), {result})")
            out.append("        return result")
        else:
            out.append(f"        return msgspec.convert(await self.call({args}), {result})")
    out += [
        "",
        "",
        "class OutboxMethods(ABC, Generic[R]):",
        '    """Every Bot API method, queued: sent after the update\'s transaction commits, never before."""',
        "",
        "    @abstractmethod",
        "    def call(self, method: str, **params: Any) -> R:",
        '        """Queue `method` with these parameters."""',
    ]
    for method in schema.methods.values():
        out += ["", *signature(method, "    def", "R")]
        out += docstring(f"{method.description}\n\n{method.href}", "        ")
        args = f'"{method.name}", **params' if method.fields else f'"{method.name}"'
        out.append(f"        return self.call({args})")
    imported = sorted(params.used | results.used)
    head += ["from .files import InputFile"] if "InputFile" in imported else []
    head += ["from .types import (", *[f"    {n}," for n in imported if n != "InputFile"], ")", ""]
    return "\n".join(head + out) + "\n"


def signature(method: Entity, prefix: str, result: str) -> list[str]:
    typed = f"**params: Unpack[{method.name[0].upper()}{method.name[1:]}Params]" if method.fields else ""
    line = f"{prefix} {snake(method.name)}(self{', ' if typed else ''}{typed}) -> {result}:"
    if len(line) <= WIDTH:
        return [line]
    return [f"{prefix} {snake(method.name)}(", f"        self, {typed}", f"    ) -> {result}:"]
