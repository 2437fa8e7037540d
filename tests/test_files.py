"""Files: an InputFile (bytes, a path, a stream) is read when the call is made or queued, sent as
multipart/form-data now (`ctx.api`) or after the commit through the outbox, its bytes waiting in the
outbox's table; over the limit it is refused when queued; downloads stream within the call deadline."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from bot.app import SECRET_HEADER
from bot.context import BotIdentity, Context, ImmediateApi
from bot.dispatch import Bot
from bot.files import PHOTO_MAX_BYTES, FileTooLarge, Upload, prepare
from bot.session import session
from bot.storage import Storage
from bot.telegram import BotApi, BotApiError
from bot.testing.env import SECRET, TOKEN, make_settings
from bot.testing.fake_telegram import FakeTelegram
from bot.testing.updates import encode, text_update
from bot.types import InputFile, InputMediaDocument, InputMediaPhoto, Message

pytestmark = pytest.mark.anyio

OpenClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64  # every byte value, CR and LF included


def context(max_upload_bytes: int = 50 * 1024 * 1024) -> Context[Any]:
    return Context(text_update(1, -5, "hi"), BotIdentity(1, "x"), ImmediateApi(None, 5, max_upload_bytes))


# --- reading, at the moment the call is queued ----------------------------------------------------


def test_a_file_from_bytes_a_path_or_a_stream_is_read_when_queued(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)
    stream = io.BytesIO(b"%PDF-1.4 a document")
    c = context()
    c.outbox.send_photo(chat_id=-5, photo=InputFile(path), caption="a cat")
    c.outbox.send_document(chat_id=-5, document=InputFile(stream, filename="doc.pdf"))
    c.outbox.send_audio(chat_id=-5, audio=InputFile(b"ID3", filename="a.mp3"))
    path.unlink()  # gone before the commit: what was queued already holds the bytes
    stream.close()
    assert [(call.params, call.files) for call in c.calls] == [
        ({"chat_id": -5, "photo": "attach://file0", "caption": "a cat"}, (Upload("file0", "cat.png", PNG),)),
        (
            {"chat_id": -5, "document": "attach://file0"},
            (Upload("file0", "doc.pdf", b"%PDF-1.4 a document"),),
        ),
        ({"chat_id": -5, "audio": "attach://file0"}, (Upload("file0", "a.mp3", b"ID3"),)),
    ]


def test_files_inside_media_are_attached_by_name_and_file_ids_stay_strings() -> None:
    params, files = prepare(
        "sendMediaGroup",
        {
            "chat_id": 7,
            "media": [
                InputMediaPhoto(media=InputFile(b"one", filename="1.jpg"), caption="first"),
                InputMediaPhoto(media="AgACAgIAAxkBAAIB"),
                InputMediaDocument(media=InputFile(b"two", filename="2.txt"), thumbnail=InputFile(b"t")),
            ],
        },
    )
    assert params == {
        "chat_id": 7,
        "media": [
            {"type": "photo", "media": "attach://file0", "caption": "first"},
            {"type": "photo", "media": "AgACAgIAAxkBAAIB"},
            {"type": "document", "media": "attach://file1", "thumbnail": "attach://file2"},
        ],
    }
    assert [(f.name, f.filename, f.data) for f in files] == [
        ("file0", "1.jpg", b"one"),
        ("file1", "2.txt", b"two"),
        ("file2", "file", b"t"),
    ]


class Endless(io.RawIOBase):
    """A stream that never ends, counting what is read from it."""

    def __init__(self) -> None:
        self.given = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        assert size >= 0, "an unbounded read of an endless stream never returns"
        self.given += size
        return b"x" * size


def test_a_file_over_the_limit_is_refused_when_queued_without_reading_all_of_it(tmp_path: Path) -> None:
    c = context(max_upload_bytes=1000)
    with pytest.raises(FileTooLarge, match="the limit is 1000 bytes"):
        c.outbox.send_document(chat_id=-5, document=InputFile(b"x" * 1001))
    stream = Endless()
    with pytest.raises(FileTooLarge, match="over 1000 bytes"):
        c.outbox.send_document(chat_id=-5, document=InputFile(stream))
    assert stream.given == 1001
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 5000)
    with pytest.raises(FileTooLarge, match="5000 bytes"):
        c.outbox.send_document(chat_id=-5, document=InputFile(big))
    c.outbox.send_document(chat_id=-5, document=InputFile(b"x" * 1000))  # at the limit: fine
    assert len(c.calls) == 1


def test_a_photo_over_telegram_s_10_mb_is_refused_while_a_document_of_that_size_is_not() -> None:
    c = context()
    photo = b"x" * (PHOTO_MAX_BYTES + 1)
    with pytest.raises(FileTooLarge, match="photos of up to 10485760 bytes"):
        c.outbox.send_photo(chat_id=-5, photo=InputFile(photo))
    with pytest.raises(FileTooLarge, match="photos of up to"):
        c.outbox.send_media_group(chat_id=-5, media=[InputMediaPhoto(media=InputFile(photo))])
    c.outbox.send_document(chat_id=-5, document=InputFile(photo))
    assert [call.method for call in c.calls] == ["sendDocument"]


# --- now: ctx.api, multipart, and downloads -------------------------------------------------------


@pytest.fixture
async def api(telegram_root: str) -> AsyncIterator[ImmediateApi]:
    async with httpx.AsyncClient() as http:
        yield ImmediateApi(BotApi(TOKEN, http, telegram_root), timeout=5)


async def test_ctx_api_uploads_as_multipart_and_the_file_comes_back_by_get_file(
    api: ImmediateApi, fake: FakeTelegram, tmp_path: Path
) -> None:
    sent = await api.send_photo(chat_id=42, photo=InputFile(PNG, filename="cat.png"), caption="a cat")
    assert isinstance(sent, Message) and sent.caption == "a cat" and sent.photo
    (call,) = fake.calls("sendPhoto")
    assert call.params == {"chat_id": "42", "photo": "attach://file0", "caption": "a cat"}
    assert call.files["file0"].filename == "cat.png" and call.files["file0"].data == PNG
    file = await api.get_file(file_id=sent.photo[-1].file_id)
    assert file.file_size == len(PNG)
    into = io.BytesIO()
    assert await api.download(file, into) == len(PNG) and into.getvalue() == PNG
    path = tmp_path / "copy.png"
    assert await api.download(sent.photo[-1].file_id, path) == len(PNG)  # by file_id: getFile first
    assert path.read_bytes() == PNG
    assert os.listdir(tmp_path) == ["copy.png"]  # no .part left behind


async def test_a_download_of_an_unknown_file_is_a_permanent_error_and_leaves_no_file(
    tmp_path: Path, telegram_root: str
) -> None:
    async with httpx.AsyncClient() as http:
        client = BotApi(TOKEN, http, telegram_root)
        with pytest.raises(BotApiError, match="404") as caught:
            await client.download("photos/none.png", tmp_path / "x.png")
    assert caught.value.permanent
    assert os.listdir(tmp_path) == []


async def test_a_download_that_trickles_ends_at_the_call_s_total_deadline(tmp_path: Path) -> None:
    async def slowly() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x"
            await asyncio.sleep(0.05)

    async def endpoint(request: Any) -> StreamingResponse:
        return StreamingResponse(slowly())

    app = Starlette(routes=[Route("/file/bot{token}/{path:path}", endpoint)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
        client = BotApi(TOKEN, http, "http://telegram", timeout=0.3)
        with pytest.raises(BotApiError, match=r"no answer within 0\.3 s"):
            await client.download("documents/slow.bin", tmp_path / "slow.bin")
    assert os.listdir(tmp_path) == []


# --- after the commit: through the webhook and the outbox -----------------------------------------


@dataclass
class Sent:
    photos: int = 0


def photo_bot(*, fail_after_queueing: bool = False) -> Bot[Sent]:
    bot = Bot(session(initial=Sent))

    @bot.command("cat")
    async def cat(ctx: Context[Sent]) -> None:
        assert ctx.chat is not None
        ctx.session.photos += 1
        ctx.outbox.send_photo(chat_id=ctx.chat.id, photo=InputFile(PNG, filename="cat.png"), caption="cat")
        if fail_after_queueing or (ctx.command is not None and ctx.command.args == "boom"):
            raise RuntimeError("after queueing the photo")

    return bot


async def post(client: httpx.AsyncClient, update: Any) -> httpx.Response:
    headers = {"content-type": "application/json", SECRET_HEADER: SECRET}
    return await client.post("/webhook", content=encode(update), headers=headers)


async def test_a_queued_photo_is_uploaded_as_multipart_after_the_commit_once_on_every_storage(
    storage_mode: tuple[Storage, bool], open_client: OpenClient, telegram_root: str, fake: FakeTelegram
) -> None:
    storage, optimistic = storage_mode
    settings = make_settings(
        "postgresql://unused/db", telegram_root, DB_CONCURRENCY="optimistic" if optimistic else "locked"
    )
    async with open_client(settings, photo_bot(), storage) as client:
        assert (await post(client, text_update(1, -77, "/cat boom"))).status_code == 200  # rolled back
        for _ in range(3):  # delivered three times
            assert (await post(client, text_update(2, -77, "/cat"))).status_code == 200
        await fake.wait_for_async(lambda: len(fake.calls("sendPhoto")) >= 1)
        await asyncio.sleep(0.3)  # room for a second upload, which must not come
    (call,) = fake.calls("sendPhoto")
    assert call.params == {"chat_id": "-77", "photo": "attach://file0", "caption": "cat"}
    assert call.files["file0"].data == PNG


async def test_a_photo_whose_upload_failed_is_sent_again_with_its_bytes_from_the_table(
    open_client: OpenClient, database_url: str, telegram_root: str, fake: FakeTelegram
) -> None:
    fake.fail_next("sendPhoto", times=1, error_code=502, description="Bad Gateway")
    settings = make_settings(database_url, telegram_root, OUTBOX_BACKOFF_MAX="1")
    async with open_client(settings, photo_bot()) as client:
        assert (await post(client, text_update(1, -78, "/cat"))).status_code == 200
        await fake.wait_for_async(lambda: len(fake.calls("sendPhoto")) >= 2, timeout=15)
    first, retry = fake.calls("sendPhoto")
    assert first.files == retry.files and retry.files["file0"].data == PNG  # from the outbox row
    assert retry.params == first.params


async def test_a_call_with_files_never_rides_in_the_webhook_answer(
    open_client: OpenClient, database_url: str, telegram_root: str, fake: FakeTelegram
) -> None:
    settings = make_settings(database_url, telegram_root, WEBHOOK_REPLY="1")
    async with open_client(settings, photo_bot()) as client:
        response = await post(client, text_update(1, -79, "/cat"))
        assert response.status_code == 200 and response.content == b""
        await fake.wait_for_async(lambda: len(fake.calls("sendPhoto")) >= 1)
    assert fake.calls("sendPhoto")[0].files["file0"].data == PNG
