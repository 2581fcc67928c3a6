"""An asyncio producer for servers (``gateway``): submit, await results, cancel, list models.

Everything is one process-wide ``redis.asyncio`` client: no thread per request. Jobs are
built, checked and enveloped by the same code as ``Client`` (``Client.prepare``,
``JobPublisher.stage``), so a job submitted here is byte for byte what ``Client.submit`` sends.
Results arrive on one shared pub/sub connection (Celery publishes each result on its key's
channel); a sweep every ``producer.poll_interval_s`` is the safety net, as in ``Client``.

    async with AsyncClient(settings) as client:
        job_id, new = await client.submit(job)
        result = await client.result(job_id, timeout=60)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import redis
import redis.asyncio as aioredis
from kombu.exceptions import OperationalError

from producer import connections, keys, records, streams
from producer.client import Client, cancel_said, models_of
from producer.errors import BrokerUnavailable, JobFailed, JobTimeout, QueueFull, RedisFull
from producer.outcomes import decode_meta, revoked_meta
from producer.protocol import ChatJob, CompletionJob, JobResult, ModelInfo, StreamChunk, StreamEnd, WorkerInfo
from producer.settings import Settings, get_settings

log = logging.getLogger(__name__)

T = TypeVar("T")
AnyJob = CompletionJob | ChatJob
Outcome = JobResult | JobFailed

#: KEYS: the job's record. ARGV: model, ttl s. Claims a job id for one submit: 1 if this call
#: created the record (submit the job), 0 if the id is already known (never run it twice).
CLAIM = """
if redis.call('HSETNX', KEYS[1], 'model', ARGV[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

#: Stream entries read per XREAD.
_XREAD_COUNT = 1000

_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError, OSError)


class AsyncClient:
    """``Client``'s submit / result / cancel / models for asyncio servers.

    ``submit`` is idempotent by job id: an id Redis already knows is not sent again (the
    caller then awaits the first job's outcome). Redis unreachable raises ``BrokerUnavailable``.
    """

    def __init__(self, settings: Settings | None = None, max_connections: int = 1024) -> None:
        self.settings = settings or get_settings()
        # The sync client is used for its pure-CPU parts only (building, checking and
        # enveloping a job; kombu's one-time queue declaration in a thread): one definition of a job's wire form.
        self._sync = Client(self.settings)
        # A blocking pool: past ``max_connections`` (each streaming reader holds one while its XREAD
        # blocks, up to producer.poll_interval_s) a call waits for a free connection rather than
        # failing (redis-py's own pool raises at 100).
        self._redis = connections.async_redis(self.settings, max_connections=max_connections, timeout_s=30)
        self._claim = self._redis.register_script(CLAIM)
        self._cancel = self._redis.register_script(records.CANCEL)
        self._waiter = _ResultWaiter(self._redis, self.settings.producer.poll_interval_s)

    async def aclose(self) -> None:
        await self._waiter.close()
        await self._redis.aclose(close_connection_pool=True)
        self._sync.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _reaching(self, pending: Awaitable[T]) -> T:
        """Await a Redis call; Redis unreachable as one ``BrokerUnavailable``."""
        try:
            return await pending
        except _REDIS_DOWN as exc:
            raise BrokerUnavailable(self.settings.redis.url, exc) from None

    # -- submitting --------------------------------------------------------------------

    async def submit(self, job: AnyJob) -> tuple[str, bool]:
        """Enqueue ``job``; returns (job id, whether this call enqueued it).

        An id Redis already holds a record of (a retry with the same id) is not enqueued again:
        ``(id, False)``, and the caller reads the first job's outcome. Raises
        ``pydantic.ValidationError`` / ``InvalidJob`` for bad input, ``QueueFull`` at
        ``queue.max_backlog`` (nothing sent), ``BrokerUnavailable``.
        """
        message = self._sync.prepare(job)  # validation, priority, deadline, images to blobs: Client's own
        publisher = self._sync.publisher
        ttl = self.settings.redis.result_ttl_s
        limit = self.settings.queue.max_backlog_for(job.model)
        if limit:
            depth = await self._reaching(self.queue_length(job.model))
            if depth + 1 > limit:
                raise QueueFull(job.model, depth, limit, 1)
        if not publisher.declared(message.queue):
            try:
                await asyncio.to_thread(publisher.declare, message.queue)  # once per queue and process
            except _REDIS_DOWN as exc:
                raise BrokerUnavailable(self.settings.redis.url, exc) from None
        claimed = await self._reaching(self._claim(keys=[keys.job_key(job.id)], args=[job.model, ttl]))
        if not claimed:
            return job.id, False

        async def send() -> None:
            # One MULTI/EXEC: a Redis at its maxmemory takes all of the job's writes or none.
            async with self._redis.pipeline(transaction=True) as pipe:
                publisher.stage(pipe, message, ttl)
                await pipe.execute()

        try:
            await self._reaching(send())
        except redis.exceptions.OutOfMemoryError as exc:
            with contextlib.suppress(*_REDIS_DOWN, redis.RedisError):
                await asyncio.shield(self._redis.delete(keys.job_key(job.id)))
            raise RedisFull(0, 1, exc) from None
        except BaseException:
            # Not sent: free the id, so that a retry with it is not left waiting for nothing.
            with contextlib.suppress(*_REDIS_DOWN, redis.RedisError):
                await asyncio.shield(self._redis.delete(keys.job_key(job.id)))
            raise
        return job.id, True

    async def queue_length(self, model: str) -> int:
        """Jobs waiting in ``model``'s queue, all priorities (one round trip)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in keys.queue_lists(model).values():
                pipe.llen(name)
            return sum(await pipe.execute())

    # -- results -----------------------------------------------------------------------

    async def outcome(self, job_id: str, timeout: float) -> Outcome:
        """The job's ``JobResult`` or ``JobFailed`` (``JobCancelled``, ``JobExpired``, ...) once it
        ends; ``JobTimeout`` after ``timeout`` seconds (the job itself is left alone)."""
        try:
            return await self._waiter.wait(job_id, timeout)
        except _REDIS_DOWN as exc:
            raise BrokerUnavailable(self.settings.redis.url, exc) from None
        except TimeoutError:
            raise JobTimeout(job_id, f"job {job_id} has no result after {timeout:g} s") from None

    async def result(self, job_id: str, timeout: float) -> JobResult:
        """As ``outcome``, raising a ``JobFailed`` outcome."""
        outcome = await self.outcome(job_id, timeout)
        if isinstance(outcome, JobFailed):
            raise outcome
        return outcome

    async def peek(self, job_id: str) -> Outcome | None:
        """The job's outcome if it has ended, else None; one GET."""
        raw = await self._reaching(self._redis.get(keys.result_key(job_id)))
        return decode_meta(job_id, raw)

    async def stream(self, job_id: str, timeout: float) -> AsyncIterator[StreamChunk]:
        """``Client.stream`` for asyncio: a streaming job's ``StreamChunk`` s as they are written,
        until its ``StreamEnd``; a job that ends other than succeeded raises its ``JobFailed``
        after its last chunks; ``JobTimeout`` after ``timeout`` seconds in all. XREAD BLOCK on a
        pooled connection: no polling while tokens flow."""
        deadline = time.monotonic() + timeout
        key = keys.stream_key(job_id)
        last = "0-0"
        ended_at: float | None = None
        poll_s = self.settings.producer.poll_interval_s
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise JobTimeout(job_id, f"job {job_id} did not finish streaming within {timeout:g} s")
            block_ms = max(1, int(min(deadline - now, poll_s) * 1000))
            reply = await self._reaching(self._redis.xread({key: last}, count=_XREAD_COUNT, block=block_ms))
            if not reply:
                # Quiet: did the job end without (yet) a stream end? A job cancelled or expired while
                # queued never streams; a worker that lost Redis may drop entries (as Client.stream).
                done, ended_at = streams.after_quiet(job_id, await self.peek(job_id), last != "0-0", ended_at,
                                                     time.monotonic())
                if done:
                    return
                continue
            for entry_id, fields in reply[0][1]:
                last = entry_id
                entry = streams.decode_entry(fields)
                if isinstance(entry, StreamEnd):
                    if entry.outcome != "succeeded":
                        outcome = await self.peek(job_id)
                        raise outcome if isinstance(outcome, JobFailed) else JobFailed(
                            job_id, entry.outcome.capitalize(), f"the job's stream ended {entry.outcome}")
                    return
                yield entry

    # -- control -----------------------------------------------------------------------

    async def cancel(self, job_id: str) -> str:
        """``Client.cancel``: the same Lua script, the same answers in words."""
        now = time.time()
        reply = await self._reaching(self._cancel(
            keys=[keys.result_key(job_id), keys.attempt_key(job_id), keys.cancel_key(job_id), keys.job_key(job_id)],
            args=[self.settings.redis.result_ttl_s, revoked_meta(job_id, "cancelled", now), job_id,
                  keys.CANCEL_CHANNEL, repr(now)]))
        return cancel_said(job_id, reply)

    # -- workers and models ------------------------------------------------------------

    async def ping(self) -> None:
        await self._reaching(self._redis.ping())

    async def workers(self) -> list[WorkerInfo]:
        """Live workers' announcements (``vqueue:worker:<hostname>``)."""

        async def read() -> list[bytes | None]:
            names = [k async for k in self._redis.scan_iter(match=f"{keys.WORKER_KEY_PREFIX}*", count=1000)]
            return await self._redis.mget(names) if names else []

        return [WorkerInfo.model_validate_json(raw) for raw in await self._reaching(read()) if raw]

    async def models(self) -> list[ModelInfo]:
        """The models live workers serve now, as ``Client.models``."""
        return models_of(await self.workers())


class _ResultWaiter:
    """Every waiting request's result on one pub/sub connection.

    A waiter subscribes to its job's result channel, then GETs the key (a result stored before
    the subscription is found; one stored after it is heard). One task reads the connection
    and resolves futures; every ``poll_interval_s`` it MGETs the pending keys (the safety net
    for a publish missed while Redis restarted). After a lost connection it subscribes again.
    """

    def __init__(self, client: aioredis.Redis, poll_interval_s: float) -> None:
        self._redis = client
        self._poll_interval_s = poll_interval_s
        self._futures: dict[str, set[asyncio.Future[Outcome]]] = {}
        self._pubsub: aioredis.client.PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    async def wait(self, job_id: str, timeout: float) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        first = job_id not in self._futures
        self._futures.setdefault(job_id, set()).add(future)
        try:
            self._start()
            if first:
                await self._subscribe([job_id])
            found = decode_meta(job_id, await self._redis.get(keys.result_key(job_id)))
            if found is not None:
                return found
            return await asyncio.wait_for(future, timeout)
        finally:
            waiting = self._futures.get(job_id)
            if waiting is not None:
                waiting.discard(future)
                if not waiting:
                    del self._futures[job_id]
                    await self._unsubscribe(job_id)

    def _start(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="vqueue-result-reader")

    async def _subscribe(self, job_ids: list[str]) -> None:
        if self._pubsub is None:
            self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(*(keys.result_key(j) for j in job_ids))

    async def _unsubscribe(self, job_id: str) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(*_REDIS_DOWN, redis.RedisError):
                await self._pubsub.unsubscribe(keys.result_key(job_id))

    def _resolve(self, job_id: str, outcome: Outcome) -> None:
        for future in self._futures.get(job_id, ()):
            if not future.done():
                future.set_result(outcome)

    async def _read(self) -> None:
        next_sweep = time.monotonic() + self._poll_interval_s
        while not self._closed:
            try:
                pubsub = self._pubsub
                if pubsub is not None and pubsub.subscribed:
                    message = await pubsub.get_message(timeout=min(self._poll_interval_s, 1.0))
                else:
                    await asyncio.sleep(0.05)
                    message = None
                if message is not None and message["type"] == "message":
                    job_id = message["channel"].decode()[len(keys.RESULT_KEY_PREFIX):]
                    outcome = decode_meta(job_id, message["data"])
                    if outcome is not None:
                        self._resolve(job_id, outcome)
                if time.monotonic() >= next_sweep:
                    await self._sweep()
                    next_sweep = time.monotonic() + self._poll_interval_s
            except asyncio.CancelledError:
                raise
            except (*_REDIS_DOWN, redis.RedisError):
                # Redis restarting: waiters keep their own timeouts; subscribe again once it is back.
                log.warning("result channel lost; subscribing again", exc_info=True)
                await self._reset()
                await asyncio.sleep(0.5)
                with contextlib.suppress(*_REDIS_DOWN, redis.RedisError):
                    await self._subscribe(list(self._futures))
                    await self._sweep()

    async def _sweep(self) -> None:
        ids = list(self._futures)
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            for job_id, raw in zip(chunk, await self._redis.mget([keys.result_key(j) for j in chunk]), strict=True):
                outcome = decode_meta(job_id, raw)
                if outcome is not None:
                    self._resolve(job_id, outcome)

    async def _reset(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self._reset()


__all__ = ["AsyncClient"]
