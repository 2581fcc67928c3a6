"""OpenAI's Batch API (``/v1/batches``) on ``producer.batch``, and the supervisor that runs them.

A batch is the hash ``vqueue:batch:<id>`` (``producer.batch.BatchState``, extended here with
``input_file_id``, ``endpoint``, ``completion_window``, ``output_file`` / ``error_file``,
``metadata`` and ``errors``) listed in the zset ``vqueue:batches``. Creating one only writes
that record and reserves its output and error files (``gateway.files``: their ids are fixed
from the start). Every gateway process runs a ``Supervisor``: every ``SUPERVISE_EVERY_S`` it
tries each unfinished batch with a ``BatchRunner`` in a thread; the runner's lease lets one
runner at a time through (``BatchBusy``: another gateway has it). A gateway that stops hands
its batches back (``runner.stop()``, lease released); one that is killed loses them to the
next supervisor when the lease runs out (at once on the same host). The runner resumes from
the output files, so each line is written exactly once whoever runs it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ApiError, bad_request
from gateway.files import OUTPUT_PURPOSE, FileStore
from producer import connections, keys
from producer.batch import (
    ENDPOINTS,
    FINAL,
    Batch,
    BatchBusy,
    BatchRunner,
    BatchState,
    Progress,
    cancel_batch,
    fingerprint,
)
from producer.client import Client
from producer.openai_api import validation_error
from producer.settings import Settings

log = logging.getLogger("vqueue.gateway.batches")

#: How often a supervisor looks for batches to run (a new batch or a cancel wakes it at once).
SUPERVISE_EVERY_S = 1.0
#: Batches one gateway process runs at once (one thread each; the rest wait for a free one, or
#: run on another gateway). Each holds up to batch.window lines in flight.
MAX_RUNNING = 16
#: After a batch's runner failed (Redis down, an unreadable file), when this gateway tries it again.
RETRY_AFTER_S = 30.0
#: How long a stopping gateway waits for its runners to hand their batches back.
STOP_WAIT_S = 10.0
#: Redis connections of one gateway process's files and batches (its jobs have the gateway's pool).
REDIS_CONNECTIONS = 32
#: ``completion_window``: OpenAI takes ``24h`` only; vqueue any positive number of s, m, h or d.
_WINDOW = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: The batch timestamps of OpenAI's Batch object, each ``<status>_at`` in the hash.
_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
          "cancelled_at")


class FilesElsewhere(Exception):
    """Raised when a batch's input file has metadata in Redis but no bytes in this gateway's files.dir."""


class CreateBatch(BaseModel):
    """``POST /v1/batches``; unknown parameters are refused by name, as on the other endpoints."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(None, max_length=16)


def window_s(text: str) -> float:
    match = _WINDOW.match(text)
    if match is None or float(match[1]) <= 0:
        raise bad_request("completion_window", f"`completion_window` {text!r}: a positive number followed by s, m, h "
                          "or d, e.g. '24h' (OpenAI's only value).")
    return float(match[1]) * _UNITS[match[2]]


def _ts(value: str | None) -> int | None:
    return int(float(value)) if value else None


def batch_object(batch_id: str, h: dict[str, str]) -> dict[str, Any]:
    """OpenAI's Batch object from the batch's hash. The output and error files are named once the
    batch is final, and only if they hold a line (as OpenAI does)."""
    status = h.get("status", "validating")
    final = status in FINAL
    completed, failed = int(h.get("completed", 0)), int(h.get("failed", 0))
    return {
        "id": batch_id, "object": "batch", "endpoint": h.get("endpoint"),
        "errors": json.loads(h["errors"]) if h.get("errors") else None,
        "input_file_id": h.get("input_file_id"), "completion_window": h.get("completion_window"),
        "status": status,
        "output_file_id": h.get("output_file") if final and completed else None,
        "error_file_id": h.get("error_file") if final and failed else None,
        "created_at": _ts(h.get("created_at")), "expires_at": _ts(h.get("deadline")),
        **{name: _ts(h.get(name)) for name in _TIMES},
        "request_counts": {"total": int(h.get("lines", 0)), "completed": completed, "failed": failed},
        "metadata": json.loads(h["metadata"]) if h.get("metadata") else None,
    }  # fmt: skip


class Supervisor:
    """Runs this process's share of the unfinished batches, each in a thread of its own."""

    def __init__(self, settings: Settings, r: aioredis.Redis, files: FileStore) -> None:
        self.settings = settings
        self._redis = r
        self._files = files
        #: The runners' Redis client (sync: ``BatchRunner`` blocks; thread-safe, one pool).
        self.client = Client(settings)
        self._pool = concurrent.futures.ThreadPoolExecutor(MAX_RUNNING, thread_name_prefix="vqueue-batch")
        self._running: dict[str, asyncio.Future[None]] = {}
        self._runners: dict[str, BatchRunner] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._retry_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except (redis.RedisError, OSError) as exc:
                # Redis restarting: the endpoints answer 503 meanwhile; one line, not a traceback a second.
                log.warning("batch supervisor: Redis unreachable (%s); trying again", exc)
            except Exception:
                log.warning("batch supervisor: could not look for batches; trying again", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SUPERVISE_EVERY_S)
            self._wake.clear()

    async def tick(self) -> None:
        ids = [i.decode() for i in await self._redis.zrange(keys.BATCHES_KEY, 0, -1)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hget(keys.batch_key(batch_id), "status")
            statuses = await pipe.execute() if ids else []
        now = time.monotonic()
        for batch_id, status in zip(ids, statuses, strict=True):
            if status is None:  # its record ran out (redis.result_ttl_s after it ended)
                await self._redis.zrem(keys.BATCHES_KEY, batch_id)
                continue
            if status.decode() in FINAL or batch_id in self._running or self._retry_at.get(batch_id, 0) > now:
                continue
            if len(self._running) >= MAX_RUNNING:
                return
            future = asyncio.get_running_loop().run_in_executor(self._pool, self._run, batch_id)
            self._running[batch_id] = future
            future.add_done_callback(lambda f, b=batch_id: self._ended(b, f))

    def _ended(self, batch_id: str, future: asyncio.Future[None]) -> None:
        self._running.pop(batch_id, None)
        error = None if future.cancelled() else future.exception()
        if error is None:
            return
        self._retry_at[batch_id] = time.monotonic() + RETRY_AFTER_S
        if isinstance(error, FilesElsewhere | redis.RedisError):
            log.warning("batch %s: %s; trying again in %g s", batch_id, error, RETRY_AFTER_S)
        else:
            log.warning("batch %s: its runner failed; this gateway tries it again in %g s", batch_id, RETRY_AFTER_S,
                        exc_info=error)

    def _run(self, batch_id: str) -> None:
        """One attempt at running the batch to its end (in a thread)."""
        state = BatchState(self.client.redis, batch_id, self.settings.redis.result_ttl_s)
        h = state.read()
        if not h or h.get("status") in FINAL:
            return
        source = self._files.path(h["input_file_id"])
        if not source.exists():
            if self.client.redis.exists(keys.file_key(h["input_file_id"])):
                # Not deleted: this gateway looks in another folder. Leave the batch to a gateway that
                # sees it, never fail it (nor write its outputs here).
                raise FilesElsewhere(f"batch {batch_id}: its input file {h['input_file_id']} is not in this "
                                     f"gateway's files.dir ({self._files.dir}); give every gateway on this Redis "
                                     "the same files.dir (a shared volume)")
            self._fail(state, "missing_input_file", f"input file {h['input_file_id']} was deleted before the batch "
                       "ran; upload it again and create a new batch")
            return
        lines = int(h["lines"]) if h.get("lines") else fingerprint(source)[1]
        batch = Batch(batch_id, source, self._files.path(h["output_file"]), self._files.path(h["error_file"]),
                      lines, deadline=float(h["deadline"]), endpoint=h["endpoint"])
        runner = BatchRunner(self.client, batch)
        with self._lock:
            if self._stopping:
                return
            self._runners[batch_id] = runner
        try:
            progress = runner.run()
            log.info("batch %s: %s (%d completed, %d failed of %d)", batch_id, state.status(), progress.completed,
                     progress.failed, progress.total)
        except BatchBusy:
            pass  # another gateway runs it
        finally:
            with self._lock:
                self._runners.pop(batch_id, None)

    def _fail(self, state: BatchState, code: str, message: str) -> None:
        state.finish("failed", Progress(total=0))
        errors = {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}
        self.client.redis.hset(state.key, "errors", json.dumps(errors))

    async def stop(self) -> None:
        """Hand every batch back: the runners return within a tick, releasing their leases; the
        jobs in flight keep running and the next runner (here or elsewhere) collects them."""
        if self._task is not None:
            self._task.cancel()
        with self._lock:
            self._stopping = True
            for runner in self._runners.values():
                runner.stop()
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=STOP_WAIT_S)
        self._pool.shutdown(wait=False)
        self.client.close()


class BatchService:
    """Per gateway process: the file store, the batches' Redis records, the supervisor."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Its own small pool: the endpoints and the supervisor make a few calls each, never block.
        self.redis = connections.async_redis(settings, max_connections=REDIS_CONNECTIONS)
        self.files = FileStore(settings, self.redis)
        self.supervisor = Supervisor(settings, self.redis, self.files)

    async def start(self) -> None:
        self.files.open()
        self.supervisor.start()

    async def aclose(self) -> None:
        await self.supervisor.stop()
        await self.redis.aclose()

    async def read(self, batch_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(keys.batch_key(batch_id))
        if not raw or b"input_file_id" not in raw:
            raise ApiError(404, "NotFoundError", f"No batch with id {batch_id!r} (never created here, or ended more "
                           "than redis.result_ttl_s ago): list them with GET /v1/batches.", "batch_id")
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def create(self, body: CreateBatch) -> dict[str, Any]:
        if body.endpoint not in ENDPOINTS:
            raise bad_request("endpoint", f"`endpoint` must be one of {', '.join(ENDPOINTS)}, not {body.endpoint!r}.")
        window = window_s(body.completion_window)
        try:
            source = await self.files.record(body.input_file_id)
        except ApiError:
            raise bad_request("input_file_id", f"No file with id {body.input_file_id!r}: upload the JSONL with "
                              "POST /v1/files (purpose 'batch') and pass the id it returns.") from None
        if source["purpose"] != "batch":
            raise bad_request("input_file_id", f"File {body.input_file_id} has purpose {source['purpose']!r}; a "
                              "batch's input must be uploaded with purpose 'batch'.")
        for key, value in (body.metadata or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise bad_request("metadata", "`metadata` keys are at most 64 characters, values at most 512.")
        batch_id = f"batch_{uuid.uuid4().hex}"
        output = await self.files.reserve(f"{batch_id}_output.jsonl", OUTPUT_PURPOSE, batch_id)
        errors = await self.files.reserve(f"{batch_id}_error.jsonl", OUTPUT_PURPOSE, batch_id)
        now = time.time()
        record = {"created_at": repr(now), "status": "validating", "input_file_id": body.input_file_id,
                  "endpoint": body.endpoint, "completion_window": body.completion_window,
                  "deadline": repr(now + window), "output_file": output, "error_file": errors,
                  "metadata": json.dumps(body.metadata) if body.metadata is not None else ""}
        # The record first (its created_at tells BatchState a creator wrote it), then the listing.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch_key(batch_id), mapping=record)
            pipe.zadd(keys.BATCHES_KEY, {batch_id: now})
            await pipe.execute()
        self.supervisor.wake()
        return batch_object(batch_id, record)

    async def list(self, after: str | None, limit: int) -> dict[str, Any]:
        start = 0
        if after is not None:
            rank = await self.redis.zrevrank(keys.BATCHES_KEY, after)
            if rank is None:
                raise bad_request("after", f"`after` names no batch ({after!r}); give the last id of the previous "
                                  "page.")
            start = rank + 1
        ids = [i.decode() for i in await self.redis.zrevrange(keys.BATCHES_KEY, start, start + limit)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hgetall(keys.batch_key(batch_id))
            raws = await pipe.execute() if ids else []
        data = [batch_object(b, {k.decode(): v.decode() for k, v in raw.items()})
                for b, raw in zip(ids, raws, strict=True) if raw]
        has_more = len(data) > limit
        data = data[:limit]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        record = await self.read(batch_id)
        if record.get("status") in FINAL:
            raise ApiError(409, "ConflictError", f"Batch {batch_id} is already {record['status']}; only a batch that "
                           "is validating or in progress can be cancelled.", "batch_id")
        said = await asyncio.to_thread(cancel_batch, self.supervisor.client, batch_id)
        log.info("%s", said)
        self.supervisor.wake()  # a batch no runner holds now gets one to end it
        return batch_object(batch_id, await self.read(batch_id))


def service_of(request: Request) -> BatchService:
    return request.app.state.batches


router = APIRouter()


@router.post("/batches")
async def create_batch(request: Request) -> dict[str, Any]:
    try:
        body = CreateBatch.model_validate_json(await request.body())
    except ValidationError as exc:
        raise validation_error(exc) from None
    return await service_of(request).create(body)


@router.get("/batches")
async def list_batches(request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
    if not 1 <= limit <= 100:
        raise bad_request("limit", f"`limit` must be 1-100, not {limit}.")
    return await service_of(request).list(after, limit)


@router.get("/batches/{batch_id}")
async def get_batch(request: Request, batch_id: str) -> dict[str, Any]:
    return batch_object(batch_id, await service_of(request).read(batch_id))


@router.post("/batches/{batch_id}/cancel")
async def cancel(request: Request, batch_id: str) -> dict[str, Any]:
    return await service_of(request).cancel(batch_id)
