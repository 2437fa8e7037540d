"""Files to upload: `InputFile`, the Bot API's "contents of a file to be uploaded", and how a call that
carries some is prepared.

`InputFile(b"...", filename="x.png")` from bytes, `InputFile(Path("x.png"))` from a path, or
`InputFile(stream, filename="x.png")` from a binary stream. A call's parameters become JSON values in one
place, `prepare`: each InputFile in them, at the top (sendPhoto's `photo`) or inside an object (an
InputMediaPhoto's `media` in sendMediaGroup), is read there and then, and replaced by the Bot API's
"attach://<name>", its bytes travelling beside the parameters as an `Upload` of that name; the client
sends such a call as multipart/form-data.

Read when the call is made or queued, not when it is sent: a queued call is sent after the commit, maybe
after a restart, when the path may be gone or the stream closed. So a file too big for Telegram is
refused there too, as a deterministic error of the handler (`FileTooLarge`), instead of a 400 from
Telegram after the update was acknowledged.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import msgspec

from .errors import BotError

__all__ = [
    "MAX_UPLOAD_BYTES",
    "PHOTO_MAX_BYTES",
    "FileTooLarge",
    "InputFile",
    "Upload",
    "pack_uploads",
    "prepare",
    "unpack_uploads",
]

# The public Bot API's limits: 50 MB for a file (UPLOAD_MAX_BYTES, higher for a local Bot API server),
# 10 MB for a photo whatever the server.
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
PHOTO_MAX_BYTES = 10 * 1024 * 1024
_ATTACH = "attach://"


class InputFile:
    """A file to upload, from bytes, a path or a binary stream; `filename` is what Telegram shows (and
    how it guesses the type): by default the path's name, else "file"."""

    __slots__ = ("data", "filename")

    def __init__(self, data: bytes | Path | IO[bytes], filename: str | None = None) -> None:
        if isinstance(data, str):
            raise TypeError(
                "InputFile(str): a str is a file_id or a URL, pass it as is; for a path use Path()"
            )
        self.data = data
        self.filename = filename or (data.name if isinstance(data, Path) else "file")

    def read(self, limit: int) -> bytes:
        """The contents, now: at most `limit` bytes are read, and a file over it raises FileTooLarge."""
        data = self.data
        if isinstance(data, Path):
            if (size := data.stat().st_size) > limit:
                raise self._too_large(f"{size} bytes", limit)
            return data.read_bytes()
        if isinstance(data, bytes | bytearray | memoryview):
            content, size_text = bytes(data), f"{len(data)} bytes"
        else:
            content, size_text = data.read(limit + 1), f"over {limit} bytes"  # a stream's size is unknown
        if len(content) > limit:
            raise self._too_large(size_text, limit)
        return content

    def _too_large(self, size: str, limit: int) -> FileTooLarge:
        return FileTooLarge(f"{self!r} is {size}: the limit is {limit} bytes")

    def __repr__(self) -> str:
        return f"<InputFile {self.filename!r}>"


class FileTooLarge(BotError, ValueError):
    """A file is over the limit for uploads (UPLOAD_MAX_BYTES; 10 MB for a photo): Telegram would refuse it."""


class Upload(msgspec.Struct, frozen=True, array_like=True):
    """A file read for a call: the parameters name it "attach://<name>"."""

    name: str
    filename: str
    data: bytes


def prepare(
    method: str, params: dict[str, Any], max_bytes: int = MAX_UPLOAD_BYTES
) -> tuple[dict[str, Any], tuple[Upload, ...]]:
    """Parameters as JSON values (Structs become dicts, without their None fields), ready for the Bot API
    or the outbox's table, and the files they carry, read now."""
    uploads: list[Upload] = []

    def attach(value: Any) -> Any:
        if isinstance(value, InputFile):
            upload = Upload(f"file{len(uploads)}", value.filename, value.read(max_bytes))
            uploads.append(upload)
            return _ATTACH + upload.name
        raise TypeError(f"a Bot API parameter cannot be a {type(value).__name__}: {value!r}")

    for name, value in params.items():
        # Raw bytes would otherwise become a base64 string, which Telegram reads as a file_id or a URL.
        if isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"{name}: bytes are a file to upload: pass InputFile(data, filename=...)")
    converted: dict[str, Any] = msgspec.to_builtins(params, enc_hook=attach)
    if uploads:
        by_name = {upload.name: upload for upload in uploads}
        for reference in _photos(method, converted):
            photo = by_name.get(reference.removeprefix(_ATTACH))
            if photo is not None and len(photo.data) > min(PHOTO_MAX_BYTES, max_bytes):
                raise FileTooLarge(
                    f"{method}: the photo {photo.filename!r} is {len(photo.data)} bytes: Telegram takes"
                    f" photos of up to {PHOTO_MAX_BYTES} bytes (send it as a document instead)"
                )
    return converted, tuple(uploads)


def _photos(method: str, params: dict[str, Any]) -> list[str]:
    """The attach:// references that Telegram reads as a photo: sendPhoto's `photo`, and the `media` of
    every InputMediaPhoto or InputPaidMediaPhoto (tagged `"type": "photo"`)."""
    found = [params["photo"]] if method == "sendPhoto" and isinstance(params.get("photo"), str) else []
    todo: list[Any] = [params]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            if value.get("type") == "photo" and isinstance(value.get("media"), str):
                found.append(value["media"])
            todo += value.values()
        elif isinstance(value, list):
            todo += value
    return [reference for reference in found if reference.startswith(_ATTACH)]


_upload_encoder = msgspec.msgpack.Encoder()
_upload_decoder = msgspec.msgpack.Decoder(list[Upload])


def pack_uploads(uploads: tuple[Upload, ...]) -> bytes | None:
    """A call's files as one value for the outbox's table (None: no files)."""
    return _upload_encoder.encode(uploads) if uploads else None


def unpack_uploads(packed: bytes | None) -> tuple[Upload, ...]:
    return tuple(_upload_decoder.decode(packed)) if packed else ()
