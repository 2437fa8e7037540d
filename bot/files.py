"""Files to upload: `InputFile`, the Bot API's "contents of a file to be uploaded".

`InputFile(b"...", filename="x.png")` from bytes, `InputFile(Path("x.png"))` from a path, or
`InputFile(stream, filename="x.png")` from a binary stream. Uploading one means a multipart/form-data
request; until the client and the outbox send those, `json_params` (the one place parameters become
JSON) refuses an InputFile with a clear error instead of sending something Telegram would misread.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import msgspec

from .errors import BotError

__all__ = ["FilesNotSupported", "InputFile", "json_params"]


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

    def __repr__(self) -> str:
        return f"<InputFile {self.filename!r}>"


class FilesNotSupported(BotError, NotImplementedError):
    """Parameters hold an InputFile, and sending files (multipart/form-data) is not implemented yet."""


def _refuse(value: Any) -> Any:
    if isinstance(value, InputFile):
        raise FilesNotSupported(
            f"uploading {value!r} needs multipart/form-data, which is not supported yet: "
            "pass a file_id or an HTTP URL as a str"
        )
    raise TypeError(f"a Bot API parameter cannot be a {type(value).__name__}: {value!r}")


def json_params(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as JSON values (Structs become dicts, without their None fields), ready for the Bot API
    or the outbox's table."""
    for name, value in params.items():
        # Raw bytes would otherwise become a base64 string, which Telegram reads as a file_id or a URL.
        if isinstance(value, bytes | bytearray | memoryview):
            raise FilesNotSupported(
                f"{name}: bytes are a file to upload (InputFile(data, filename=...)), which needs "
                "multipart/form-data, not supported yet: pass a file_id or an HTTP URL as a str"
            )
    converted: dict[str, Any] = msgspec.to_builtins(params, enc_hook=_refuse)
    return converted
