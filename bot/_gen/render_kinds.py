"""`bot/kinds.py`'s text: for each update kind (Update's fields), a handler decorator for `Router` and an
accessor for `Context`."""

from __future__ import annotations

from .schema import Schema
from .source import PRIMITIVES, Annotations, docstring, field_doc, preamble

__all__ = ["render_kinds"]


def render_kinds(schema: Schema) -> str:
    kinds = schema.update_kinds
    names = Annotations(schema, primitives=PRIMITIVES, array="list")
    out = [
        *preamble(
            schema,
            f"The update kinds of the Telegram {schema.version}: a handler decorator and a context accessor for\n"
            "each, so every kind reads the same way (`@bot.inline_query()`, `ctx.inline_query`).",
        ),
        "from abc import ABC, abstractmethod",
        "from collections.abc import Awaitable, Callable, Iterable",
        "from typing import TYPE_CHECKING, TypeVar",
        "",
        "if TYPE_CHECKING:",
        "    from .filters import Check",
        "    from .types import (",
        *[f"        {t}," for t in sorted({names.union(k.types) for k in kinds})],
        "        Update,",
        "    )",
        "",
        '__all__ = ["KindAccessors", "KindRoutes"]',
        "",
        'H = TypeVar("H", bound=Callable[..., Awaitable[None]])',
        "",
        "",
        "class KindRoutes(ABC):",
        '    """A decorator per update kind: `@router.poll_answer()` registers a handler for `poll_answer`."""',
        "",
        "    @abstractmethod",
        "    def on(self, kinds: str | Iterable[str], *filters: Check) -> Callable[[H], H]:",
        '        """Register a handler for these update kinds, run when every filter agrees."""',
    ]
    for kind in kinds:
        out += ["", f"    def {kind.name}(self, *filters: Check) -> Callable[[H], H]:"]
        out += docstring(f"Handle `{kind.name}` updates: {field_doc(kind)}", "        ")
        out.append(f'        return self.on("{kind.name}", *filters)')
    out += [
        "",
        "",
        "class KindAccessors:",
        '    """A property per update kind: `ctx.poll_answer` is the update\'s PollAnswer, or None."""',
        "",
        "    update: Update",
    ]
    for kind in kinds:
        out += ["", "    @property", f"    def {kind.name}(self) -> {names.union(kind.types)} | None:"]
        out += docstring(field_doc(kind), "        ")
        out.append(f"        return self.update.{kind.name}")
    return "\n".join(out) + "\n"
