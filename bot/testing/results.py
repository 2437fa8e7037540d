"""What the fake Bot API answers to a method it has no handler of its own for: the smallest valid value of
the method's result type, deterministic, with what the call says filled in where a field names it (the
chat, the text, the message id...).

The result types are the ones `bot/methods.py` decodes each result into, which the generator wrote from
the Bot API schema's `returns`: so every method of the schema gets an answer its typed call decodes
(tests/test_fake_telegram.py calls all of them through `ctx.api`).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import msgspec

from .. import methods
from ..files import Upload
from ..methods import METHODS, ApiMethods
from ..types import Message

__all__ = ["RESULT_TYPES", "SENT_MEDIA", "FileStore", "minimal"]


def _result_types() -> dict[str, Any]:
    found = {}
    for api_name, name in METHODS.items():
        hints = get_type_hints(getattr(ApiMethods, name), vars(methods))
        found[api_name] = hints["return"]
    return found


# Bot API method name → the type its result decodes into (`Message`, `bool`, `list[Update]`...).
RESULT_TYPES: dict[str, Any] = _result_types()


def minimal(
    tp: Any, given: Mapping[str, Any] | None = None, *, prefer: Callable[[Any], bool] | None = None
) -> Any:
    """A JSON value of type `tp`: its required fields only, each the smallest valid value, except those
    `given` names (by the API's field name, at any depth: `chat` or `text` fill every such field).
    In a union the first member `prefer` accepts is taken, else the first that is not None."""
    return _Builder(given or {}, prefer).value(tp, 0)


class _Builder:
    def __init__(self, given: Mapping[str, Any], prefer: Callable[[Any], bool] | None) -> None:
        self.given = given
        self.prefer = prefer

    def value(self, tp: Any, depth: int) -> Any:
        if depth > 40:
            raise ValueError(f"{tp}: the required fields go round in a circle")
        origin = get_origin(tp)
        if origin is typing.Annotated:
            return self.value(get_args(tp)[0], depth)
        if origin in (Union, types.UnionType):
            members = [m for m in get_args(tp) if m is not type(None)]
            chosen = next((m for m in members if self.prefer is not None and self.prefer(m)), members[0])
            return self.value(chosen, depth)
        if origin is Literal:
            return get_args(tp)[0]
        if origin in (list, Sequence):
            return []
        if origin is dict or tp is object:
            return {}
        if tp is bool:
            return True
        if tp is int:
            return 1
        if tp is float:
            return 0.0
        if tp is str:
            return "x"
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            return self.struct(tp, depth)
        raise TypeError(f"no minimal value for {tp!r}")

    def struct(self, cls: type[msgspec.Struct], depth: int) -> dict[str, Any]:
        config = cls.__struct_config__
        out: dict[str, Any] = {}
        if isinstance(config.tag_field, str):
            out[config.tag_field] = config.tag
        for field in msgspec.structs.fields(cls):
            if field.encode_name in self.given:
                out[field.encode_name] = self.given[field.encode_name]
            elif field.required:
                out[field.encode_name] = self.value(field.type, depth + 1)
        return out


# The send methods whose message carries the file they send, by the parameter (and message field) name.
SENT_MEDIA = {
    "sendPhoto": "photo",
    "sendAudio": "audio",
    "sendDocument": "document",
    "sendVideo": "video",
    "sendAnimation": "animation",
    "sendVoice": "voice",
    "sendVideoNote": "video_note",
    "sendSticker": "sticker",
}
_MESSAGE_FIELDS = {f.encode_name: f.type for f in msgspec.structs.fields(Message)}


class FileStore:
    """The files the fake was sent (uploads, kept by the file_id it gave them) and what getFile and the
    file download answer for them. Not thread-safe: the fake calls it under its lock."""

    def __init__(self) -> None:
        self._by_id: dict[str, tuple[str, bytes]] = {}  # file_id -> (file_path, content)
        self._by_path: dict[str, bytes] = {}

    def keep(self, upload: Upload, kind: str) -> str:
        file_id = f"fake-{kind}-{len(self._by_id) + 1}"
        path = f"{kind}s/file_{len(self._by_id) + 1}{_suffix(upload.filename)}"
        self._by_id[file_id] = (path, upload.data)
        self._by_path[path] = upload.data
        return file_id

    def file(self, file_id: str) -> dict[str, Any] | None:
        """getFile's answer for a file_id the fake gave out, else None."""
        kept = self._by_id.get(file_id)
        if kept is None:
            return None
        path, content = kept
        return {
            "file_id": file_id,
            "file_unique_id": _unique(file_id),
            "file_size": len(content),
            "file_path": path,
        }

    def content(self, file_path: str) -> bytes | None:
        return self._by_path.get(file_path)

    def media(self, method: str, params: Mapping[str, Any], files: Mapping[str, Upload]) -> dict[str, Any]:
        """The fields of a sent message that show what it sends: a photo's sizes, a document..."""
        field = SENT_MEDIA.get(method)
        if field is None or not isinstance(params.get(field), str):
            return {}
        return {field: self.shown(field, params[field], files)}

    def shown(self, field: str, reference: str, files: Mapping[str, Upload]) -> Any:
        """The message field `field` (photo, document...) for a file given as a file_id, a URL or an
        attach:// reference to an upload of this call."""
        upload = files.get(reference.removeprefix("attach://")) if reference.startswith("attach://") else None
        file_id = self.keep(upload, field) if upload is not None else reference
        size = len(upload.data) if upload is not None else 0
        given = {"file_id": file_id, "file_unique_id": _unique(file_id), "file_size": size}
        if field == "photo":
            return [{**given, "width": 1, "height": 1}]
        return minimal(_MESSAGE_FIELDS[field], given)


def _unique(file_id: str) -> str:
    return "u" + file_id.rsplit("-", 1)[-1]


def _suffix(filename: str) -> str:
    dot = filename.rfind(".")
    return filename[dot:] if 0 < dot < len(filename) - 1 and filename[dot:].replace(".", "").isalnum() else ""
