"""A Bot API request's parameters read as the Bot API reads them: the query string, then a JSON body, a
urlencoded form or multipart/form-data (an upload: its files come apart, by part name). For the servers
that stand in for Telegram: the fake Bot API (bot.testing) and the playground's stand-in."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request

from .errors import BotError
from .files import Upload

__all__ = ["BadForm", "parse_body", "read_params"]

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?')
_DISPOSITION = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class BadForm(BotError, ValueError):
    """The body is not what its content-type says (Telegram's answer: 400)."""


async def read_params(request: Request) -> tuple[dict[str, Any], dict[str, Upload]]:
    """The call's parameters (the query string's, then the body's) and its files by part name."""
    params: dict[str, Any] = dict(request.query_params)
    found, files = parse_body(await request.body(), request.headers.get("content-type", ""))
    return {**params, **found}, files


def parse_body(body: bytes, content_type: str) -> tuple[dict[str, Any], dict[str, Upload]]:
    """A body's parameters (a multipart field or a urlencoded value as the string sent; a JSON body as
    its values) and its files by part name."""
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == "application/json":
        try:
            decoded = json.loads(body) if body else {}
        except ValueError:
            raise BadForm("can't parse JSON") from None
        if not isinstance(decoded, dict):
            raise BadForm("can't parse JSON: an object expected")
        return decoded, {}
    if media_type == "application/x-www-form-urlencoded":
        return dict(parse_qsl(body.decode("utf-8", "replace"))), {}
    if media_type == "multipart/form-data":
        fields, files = _multipart(body, content_type)
        return dict(fields), files
    return {}, {}


def _multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, Upload]]:
    """RFC 7578: parts between `--boundary` lines, each with its headers, a blank line and its content."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise BadForm("multipart/form-data without a boundary")
    delimiter = b"\r\n--" + found.group(1).encode("latin-1")
    fields: dict[str, str] = {}
    files: dict[str, Upload] = {}
    chunks = (b"\r\n" + body).split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise BadForm("multipart/form-data body without its closing boundary")
    for chunk in chunks[1:-1]:
        head, separator, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not separator:
            raise BadForm("a multipart part without headers")
        disposition = next(
            (
                line.partition(":")[2]
                for line in head.decode("utf-8", "replace").split("\r\n")
                if line.lower().startswith("content-disposition:")
            ),
            "",
        )
        names = dict(_DISPOSITION.findall(disposition))
        if "name" not in names:
            raise BadForm("a multipart part without a name")
        if "filename" in names:
            files[names["name"]] = Upload(names["name"], names["filename"], content)
        else:
            fields[names["name"]] = content.decode("utf-8", "replace")
    return fields, files
