"""OpenAI's Files API (``/v1/files``): batch inputs uploaded, batch outputs read back.

A file's bytes are ``<files.dir>/<file id>`` (a folder every gateway reaches: a shared volume
when several run); its metadata is the hash ``vqueue:file:<id>`` and the zset ``vqueue:files``
lists them (``producer.keys``). An upload is written to a hidden temporary name and renamed
into place, so no reader, and no batch, ever sees half a file. Files live until deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import redis.asyncio as aioredis
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from gateway.errors import ApiError, bad_request
from producer import keys
from producer.settings import Settings

#: What ``POST /v1/files`` accepts as ``purpose``: vqueue stores files for batches only.
UPLOAD_PURPOSES = ("batch",)
#: The purpose of a batch's output and error files, as OpenAI names it.
OUTPUT_PURPOSE = "batch_output"
#: File ids as this module makes them; anything else is refused before it comes near a path.
_FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
#: Room for the multipart framing around a file at the Content-Length check.
_MULTIPART_SLACK = 64 * 1024
_COPY_CHUNK = 1 << 20


class TooLarge(Exception):
    """Raised when an upload passes ``files.max_bytes`` while it is copied."""


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def not_found(file_id: str) -> ApiError:
    return ApiError(404, "NotFoundError", f"No file with id {file_id!r}: list them with GET /v1/files.", "file_id")


class FileStore:
    """The files of ``/v1/files``, on disk and in Redis."""

    def __init__(self, settings: Settings, r: aioredis.Redis) -> None:
        self.dir = Path(settings.files.dir).resolve()
        self.max_bytes = settings.files.max_bytes
        self._redis = r

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        """Where the file's bytes are; a 404 for anything that is not one of our ids."""
        if not _FILE_ID.match(file_id):
            raise not_found(file_id)
        return self.dir / file_id

    async def save(self, upload: UploadFile, purpose: str) -> dict[str, Any]:
        file_id = new_file_id()
        final = self.path(file_id)
        part = self.dir / f".{file_id}.part"
        try:
            size = await asyncio.to_thread(_copy, upload.file, part, self.max_bytes)
            os.replace(part, final)  # same folder: atomic
        except TooLarge:
            raise self.too_large(None) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        record = {"id": file_id, "filename": upload.filename or file_id, "purpose": purpose, "bytes": size,
                  "created_at": int(time.time())}
        try:
            await self._write(record)
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return file_object(record, size)

    async def reserve(self, filename: str, purpose: str, batch_id: str) -> str:
        """A new empty file (a batch's output or errors): its id is known before a line is written."""
        file_id = new_file_id()
        self.path(file_id).touch()
        await self._write({"id": file_id, "filename": filename, "purpose": purpose, "bytes": 0,
                           "created_at": int(time.time()), "batch": batch_id})
        return file_id

    async def _write(self, record: dict[str, Any]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.file_key(record["id"]), mapping=record)
            pipe.zadd(keys.FILES_KEY, {record["id"]: record["created_at"]})
            await pipe.execute()

    async def record(self, file_id: str) -> dict[str, str]:
        """The file's metadata; a 404 naming it if there is none."""
        self.path(file_id)
        raw = await self._redis.hgetall(keys.file_key(file_id))
        if not raw:
            raise not_found(file_id)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def get(self, file_id: str) -> dict[str, Any]:
        record = await self.record(file_id)
        return file_object(record, self._size(file_id, record))

    def _size(self, file_id: str, record: dict[str, str]) -> int:
        # A batch's output grows while it runs: the file is the truth, the record the fallback.
        try:
            return self.path(file_id).stat().st_size
        except FileNotFoundError:
            return int(record.get("bytes", 0))

    async def list(self, after: str | None, limit: int, order: str, purpose: str | None) -> dict[str, Any]:
        ids = [i.decode() for i in await self._redis.zrange(keys.FILES_KEY, 0, -1, desc=order == "desc")]
        if after is not None:
            if after not in ids:
                raise bad_request("after", f"`after` names no file ({after!r}); give the last id of the previous page.")
            ids = ids[ids.index(after) + 1:]
        async with self._redis.pipeline(transaction=False) as pipe:
            for file_id in ids:
                pipe.hgetall(keys.file_key(file_id))
            raws = await pipe.execute() if ids else []
        page: list[dict[str, Any]] = []
        for file_id, raw in zip(ids, raws, strict=True):
            if not raw:
                continue
            record = {k.decode(): v.decode() for k, v in raw.items()}
            if purpose is not None and record.get("purpose") != purpose:
                continue
            if len(page) == limit:
                return _page(page, has_more=True)
            page.append(file_object(record, self._size(file_id, record)))
        return _page(page, has_more=False)

    async def delete(self, file_id: str) -> dict[str, Any]:
        await self.record(file_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.file_key(file_id))
            pipe.zrem(keys.FILES_KEY, file_id)
            await pipe.execute()
        self.path(file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def too_large(self, size: int | None) -> ApiError:
        got = f" ({size} bytes)" if size is not None else ""
        return bad_request("file", f"The file is over files.max_bytes ({self.max_bytes} bytes){got}: split it into "
                           "several batches, or raise files.max_bytes (VQUEUE_FILES__MAX_BYTES).")


def _copy(src: BinaryIO, dst: Path, limit: int) -> int:
    size = 0
    with dst.open("wb") as out:
        while chunk := src.read(_COPY_CHUNK):
            size += len(chunk)
            if size > limit:
                raise TooLarge
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size


def file_object(record: dict[str, Any], size: int) -> dict[str, Any]:
    """OpenAI's FileObject."""
    return {"id": record["id"], "object": "file", "bytes": size, "created_at": int(record["created_at"]),
            "filename": record["filename"], "purpose": record["purpose"], "status": "processed",
            "expires_at": None, "status_details": None}


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def store_of(request: Request) -> FileStore:
    return request.app.state.batches.files


router = APIRouter()


@router.post("/files")
async def upload(request: Request) -> dict[str, Any]:
    store = store_of(request)
    # Refuse a body far over the limit before it is spooled to disk; the exact count comes in _copy.
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > store.max_bytes + _MULTIPART_SLACK:
        raise store.too_large(int(length))
    form = await request.form(max_files=1, max_fields=8)
    try:
        extra = sorted(set(form) - {"file", "purpose"})
        if extra:
            raise bad_request(extra[0], f"`{extra[0]}` is not supported: vqueue keeps a file until DELETE "
                              "/v1/files/{id}; send only `file` and `purpose`.")
        purpose = form.get("purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise bad_request("purpose", f"`purpose` must be {' or '.join(map(repr, UPLOAD_PURPOSES))} (vqueue stores "
                              f"batch input files), not {purpose!r}.")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad_request("file", "`file` is missing: send the JSONL file as the multipart field `file`.")
        return await store.save(upload, str(purpose))
    finally:
        await form.close()


@router.get("/files")
async def list_files(request: Request, after: str | None = None, limit: int = 10000, order: str = "desc",
                     purpose: str | None = None) -> dict[str, Any]:
    if not 1 <= limit <= 10000:
        raise bad_request("limit", f"`limit` must be 1-10000, not {limit}.")
    if order not in ("asc", "desc"):
        raise bad_request("order", f"`order` must be 'asc' or 'desc', not {order!r}.")
    return await store_of(request).list(after, limit, order, purpose)


@router.get("/files/{file_id}")
async def get_file(request: Request, file_id: str) -> dict[str, Any]:
    return await store_of(request).get(file_id)


@router.get("/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> FileResponse:
    store = store_of(request)
    record = await store.record(file_id)
    path = store.path(file_id)
    if not path.exists():
        raise ApiError(404, "NotFoundError", f"File {file_id} has metadata but no bytes in files.dir ({store.dir}): "
                       "is files.dir the same folder on every gateway?", "file_id")
    return FileResponse(path, media_type="application/octet-stream", filename=record["filename"])


@router.delete("/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    return await store_of(request).delete(file_id)
