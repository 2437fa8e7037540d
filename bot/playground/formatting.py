"""A formatted message as Telegram reads it: `parse_mode` HTML, MarkdownV2 or Markdown turned into the
plain text and its entities (bold from here to there, a link...), as Telegram does before it shows one.

The playground draws a message from its text and entities with DOM nodes and textContent: nothing the
bot sends is ever parsed as HTML by the page, so no reply can inject a script. Markup Telegram refuses
(an unknown tag, an unclosed one, an unescaped MarkdownV2 character) is refused here too, with
Telegram's words, so a bot that passes the playground is not refused by Telegram for its formatting.
Offsets and lengths count UTF-16 code units, as Telegram's (and JavaScript's) do.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

from ..errors import BotError

__all__ = ["BadMarkup", "entities_of"]

Entity = dict[str, Any]

# Telegram's HTML tags and the entity each makes.
_TAGS = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "tg-spoiler": "spoiler",
    "code": "code",
    "pre": "pre",
    "a": "text_link",
    "blockquote": "blockquote",
    "tg-emoji": "custom_emoji",
    "span": "spoiler",  # only as <span class="tg-spoiler">
}


class BadMarkup(BotError, ValueError):
    """Telegram's 400: "can't parse entities: ..."."""


def _units(text: str) -> int:
    """The length of `text` in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def entities_of(text: str, parse_mode: str | None) -> tuple[str, list[Entity]]:
    """The plain text and its entities, or BadMarkup with Telegram's reason."""
    mode = (parse_mode or "").lower()
    if mode == "html":
        return _Html.parse(text)
    if mode == "markdownv2":
        return _markdown(text, v2=True)
    if mode == "markdown":
        return _markdown(text, v2=False)
    if mode:
        raise BadMarkup(f"unsupported parse_mode {parse_mode!r}")
    return text, []


class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.at = 0  # in UTF-16 units (not `offset`: HTMLParser keeps its own there)
        self.open: list[tuple[str, Entity]] = []
        self.entities: list[Entity] = []

    @classmethod
    def parse(cls, text: str) -> tuple[str, list[Entity]]:
        parser = cls()
        parser.feed(text)
        parser.close()
        if parser.open:
            raise BadMarkup(
                f"can't parse entities: can't find end tag corresponding to start tag {parser.open[-1][0]}"
            )
        plain = "".join(parser.text)
        return plain, sorted(parser.entities, key=lambda e: (e["offset"], -e["length"]))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        kind = _TAGS.get(tag)
        values = {name: value or "" for name, value in attrs}
        if kind is None or (tag == "span" and values.get("class") != "tg-spoiler"):
            raise BadMarkup(f'can\'t parse entities: unsupported start tag "{tag}"')
        entity: Entity = {"type": kind, "offset": self.at}
        if tag == "a":
            entity["url"] = values.get("href", "")
        elif (
            tag == "code"
            and self.open
            and self.open[-1][0] == "pre"
            and values.get("class", "").startswith("language-")
        ):
            self.open[-1][1]["language"] = values["class"].removeprefix("language-")
            entity = {}  # <pre><code class="language-x"> is one pre entity with a language
        elif tag == "blockquote" and "expandable" in values:
            entity["type"] = "expandable_blockquote"
        elif tag == "tg-emoji":
            entity["custom_emoji_id"] = values.get("emoji-id", "")
        self.open.append((tag, entity))

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1][0] != tag:
            raise BadMarkup(f'can\'t parse entities: unexpected end tag "{tag}"')
        _, entity = self.open.pop()
        if entity:
            entity["length"] = self.at - entity["offset"]
            if entity["length"]:
                self.entities.append(entity)

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        self.at += _units(data)


# MarkdownV2's markers, longest first ("__" before "_", "```" before "`"), and their entities.
_V2_MARKERS = (
    ("```", "pre"),
    ("||", "spoiler"),
    ("__", "underline"),
    ("*", "bold"),
    ("_", "italic"),
    ("~", "strikethrough"),
    ("`", "code"),
)
_V1_MARKERS = (("```", "pre"), ("*", "bold"), ("_", "italic"), ("`", "code"))
# MarkdownV2: these must be escaped with a backslash anywhere outside code.
_V2_RESERVED = set("_*[]()~`>#+-=|{}.!")
_LINK = re.compile(r"\[((?:[^\]\\]|\\.)*)\]\(((?:[^)\\]|\\.)*)\)")


def _markdown(text: str, *, v2: bool) -> tuple[str, list[Entity]]:
    markers = _V2_MARKERS if v2 else _V1_MARKERS
    out: list[str] = []
    offset = 0
    open_: list[tuple[str, Entity]] = []
    entities: list[Entity] = []
    i = 0

    def emit(chunk: str) -> None:
        nonlocal offset
        out.append(chunk)
        offset += _units(chunk)

    while i < len(text):
        char = text[i]
        in_code = bool(open_) and open_[-1][1]["type"] in ("code", "pre")
        if char == "\\" and v2 and i + 1 < len(text):
            emit(text[i + 1])
            i += 2
            continue
        if not in_code and char == "[":
            link = _LINK.match(text, i)
            if link is None:
                raise BadMarkup("can't parse entities: character '[' is reserved and must be escaped")
            label, entities_in_label = _markdown(link.group(1), v2=v2)
            start = offset
            emit(label)
            entities += [{**e, "offset": e["offset"] + start} for e in entities_in_label]
            url = re.sub(r"\\(.)", r"\1", link.group(2))
            entities.append({"type": "text_link", "offset": start, "length": offset - start, "url": url})
            i = link.end()
            continue
        marker = next((m for m in markers if text.startswith(m[0], i)), None)
        if marker is not None and (not in_code or marker[1] == open_[-1][1]["type"]):
            symbol, kind = marker
            if open_ and open_[-1][0] == symbol:
                _, entity = open_.pop()
                entity["length"] = offset - entity["offset"]
                if entity["length"]:
                    entities.append(entity)
            else:
                entity = {"type": kind, "offset": offset}
                i += len(symbol)
                if kind == "pre":  # ```language\n: the first line names the language
                    line_end = text.find("\n", i)
                    if line_end > i and text[i:line_end].strip() and " " not in text[i:line_end].strip():
                        entity["language"] = text[i:line_end].strip()
                        i = line_end + 1
                open_.append((symbol, entity))
                continue
            i += len(symbol)
            continue
        if v2 and not in_code and char in _V2_RESERVED:
            raise BadMarkup(
                f"can't parse entities: character '{char}' is reserved and must be escaped with the preceding '\\'"
            )
        emit(char)
        i += 1
    if open_:
        raise BadMarkup(
            f"can't parse entities: can't find end of {open_[-1][1]['type']} entity at byte offset {open_[-1][1]['offset']}"
        )
    return "".join(out), sorted(entities, key=lambda e: (e["offset"], -e["length"]))
