"""What the fake Bot API answers to a method it has no handler of its own for: the smallest valid value of
the method's result type, deterministic, with what the call says filled in where a field names it (the
chat, the text, the message id...).

The result types are the ones `bot/methods.py` decodes each result into, which the generator wrote from
the Bot API schema's `returns`: so every method of the schema gets an answer its typed call decodes
(tests/test_fake_telegram.py calls all of them through `ctx.api`).
"""

from __future__ import annotations

import itertools
import json
import threading
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import methods
from ..errors import BotError
from ..files import Upload
from ..methods import METHODS, ApiMethods
from ..types import Message

__all__ = ["RESULT_TYPES", "SENT_MEDIA", "ApiError", "FileStore", "MessageAnswers", "as_int", "minimal"]


class ApiError(BotError):
    """An answer `{"ok": false}` of the fake, with Telegram's code, words and parameters."""

    def __init__(self, code: int, description: str, **parameters: int | None) -> None:
        self.code, self.description = code, description
        self.parameters = {name: value for name, value in parameters.items() if value is not None}


def as_int(params: Mapping[str, Any], name: str) -> int:
    try:
        return int(params[name])
    except (KeyError, TypeError, ValueError):
        raise ApiError(400, f"Bad Request: {name} is required") from None


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


class MessageAnswers:
    """The fake's answers that make messages: a send of any kind (a file it sends kept for getFile and
    the download), an edit, a media group; and every other method's smallest valid result. Mixed into
    FakeTelegram, whose state it shares."""

    username: str
    clock: Callable[[], float]
    _lock: threading.Condition
    _files: FileStore
    _message_ids: itertools.count[int]

    def _message(self, bot_id: int, params: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """The Message a send of these parameters makes: a new message id, the text or caption sent."""
        chat_id = as_int(params, "chat_id")
        with self._lock:
            message_id = next(self._message_ids)
        message: dict[str, Any] = {
            "message_id": message_id,
            "from": {"id": bot_id, "is_bot": True, "first_name": "Test bot", "username": self.username},
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
            "date": int(self.clock()),
        }
        for name in ("text", "caption"):
            if isinstance(params.get(name), str) and params[name]:
                message[name] = params[name]
        if "message_thread_id" in params:
            message["message_thread_id"] = int(params["message_thread_id"])
        return {**message, **fields}

    def _any_method(self, bot_id: int, method: str, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        """A method without a handler of its own: a message for a send (with the file it sends, kept for
        getFile), else the smallest valid result of the method's type."""
        if method == "sendMediaGroup":
            return self._media_group(bot_id, params, files)
        result_type = RESULT_TYPES[method]
        sends_message = Message in (typing.get_args(result_type) or (result_type,))
        if sends_message and "chat_id" in params and not params.get("inline_message_id"):
            with self._lock:
                media = self._files.media(method, params, files)
            return self._message(bot_id, params, **media)
        return minimal(result_type, prefer=lambda t: t is bool and "inline_message_id" in params)

    def _media_group(self, bot_id: int, params: dict[str, Any], files: dict[str, Upload]) -> list[Any]:
        media = params.get("media")
        items = json.loads(media) if isinstance(media, str) else media
        if not isinstance(items, list) or not 1 <= len(items) <= 10:
            raise ApiError(400, "Bad Request: media must be an array of 1 to 10 items")
        messages = []
        for item in items:
            kind = item.get("type") if isinstance(item, dict) else None
            if (
                not isinstance(kind, str)
                or kind not in SENT_MEDIA.values()
                or not isinstance(item.get("media"), str)
            ):
                raise ApiError(400, "Bad Request: wrong media in the media group")
            with self._lock:
                shown = self._files.shown(kind, item["media"], files)
            messages.append(self._message(bot_id, {"chat_id": params["chat_id"], **item}, **{kind: shown}))
        return messages

    async def _m_getFile(self, bot_id: int, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            found = self._files.file(str(params.get("file_id", "")))
        if found is None:
            raise ApiError(400, "Bad Request: invalid file_id")
        return found

    async def _file(self, request: Request) -> Response:
        """A file's download, as `{root}/file/bot<token>/<file_path>`."""
        with self._lock:
            content = self._files.content(request.path_params["file_path"])
        if content is None:
            return JSONResponse({"ok": False, "error_code": 404, "description": "Not Found"}, status_code=404)
        return Response(content, media_type="application/octet-stream")

    async def _m_editMessageText(self, bot_id: int, params: dict[str, Any]) -> dict[str, Any] | bool:
        if not params.get("text"):
            raise ApiError(400, "Bad Request: message text is empty")
        if params.get("inline_message_id"):
            return True
        return self._message(
            bot_id, params, message_id=as_int(params, "message_id"), edit_date=int(self.clock())
        )
