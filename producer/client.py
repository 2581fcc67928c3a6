"""The producer's Python API: submit jobs, read their results back from Redis."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Literal

import redis
from kombu.exceptions import OperationalError

from producer import backlog, connections, keys, records, streams
from producer.errors import (
    BrokerUnavailable,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobNotFound,
    JobTimeout,
    ModelNotServed,
    QueueFull,
    RedisFull,
)
from producer.images import move_images_to_blobs
from producer.outcomes import decode_meta, revoked_error, revoked_meta, state_of
from producer.protocol import (
    ChatJob,
    CompletionJob,
    DeadLetter,
    JobRecord,
    JobResult,
    ModelInfo,
    QueueStats,
    StreamChunk,
    StreamEnd,
    WorkerInfo,
    WorkerLoad,
    parse_job,
)
from producer.settings import Settings, get_settings
from producer.transport import JobPublisher, Outgoing, make_celery
from producer.watch import OutcomeWatcher

#: Stream entries one XREAD returns at most.
_XREAD_COUNT = 1000
#: How long ``Client.stream`` waits for a stream end once the job's outcome is stored without
#: one (the worker's writes lag its result, or were lost while Redis was away).

AnyJob = CompletionJob | ChatJob
IfUnserved = Literal["wait", "fail"]


class Client:
    """Submits jobs to the model queues and reads their results back from Redis.

    :param settings: defaults to ``get_settings()`` (``settings.toml`` + environment).

    ``result`` raises ``JobFailed`` or ``JobTimeout``; ``as_completed`` yields each
    ``JobResult``, or the ``JobFailed`` of a job that failed, in the order they finish.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._celery = make_celery(self.settings, name="vqueue-producer", results=False)
        self._redis = connections.redis_client(self.settings)
        #: Sends prepared messages (``prepare``); the asyncio client stages them through it too.
        self.publisher = JobPublisher(self._celery, self._redis)
        self._cancel = self._redis.register_script(records.CANCEL)
        self._purge = self._redis.register_script(records.PURGE)

    @property
    def redis(self) -> redis.Redis:
        """This client's Redis connection (one pool; thread-safe)."""
        return self._redis

    def close(self) -> None:
        self._redis.close()
        self._celery.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting --------------------------------------------------------------------

    def submit(self, job: AnyJob, if_unserved: IfUnserved = "wait") -> str:
        """Enqueue one job on its model's queue; returns the job id.

        ``if_unserved``: ``"wait"`` (default) queues a job for a model no live worker serves,
        since workers may start later; ``"fail"`` raises ``ModelNotServed`` instead.
        """
        return self.submit_many([job], if_unserved=if_unserved)[0]

    def submit_many(self, jobs: Iterable[AnyJob], if_unserved: IfUnserved = "wait") -> list[str]:
        """Enqueue many jobs in pipelined round trips; returns their ids in order.

        Every job is checked before any is sent: one bad job raises and enqueues nothing, and
        so does a model whose backlog would pass ``queue.max_backlog`` (``QueueFull``).
        """
        jobs = list(jobs)
        messages = [self.prepare(job) for job in jobs]
        if if_unserved == "fail":
            served = {m.id for m in self.models()}
            for model in dict.fromkeys(j.model for j in jobs):
                if model not in served:
                    raise ModelNotServed(model, sorted(served))
        with self._reaching_redis():
            self._check_backlog(jobs)
            self.publisher.publish(messages, blob_ttl_s=self.settings.redis.result_ttl_s)
        return [job.id for job in jobs]

    def submit_new(self, jobs: Iterable[AnyJob]) -> list[str]:
        """Enqueue those of ``jobs`` whose id Redis holds no record of; returns the ids enqueued.

        For callers that may send the same jobs again (a batch file run again after a crash):
        a job is enqueued with its record in one MULTI/EXEC, so a record means its message
        was queued, and a job sent twice runs once. Callers must not race each other on the
        same ids (a batch holds a lease for that). ``QueueFull`` as ``submit_many``.
        """
        jobs = list(jobs)
        if not jobs:
            return []
        with self._reaching_redis():
            with self._redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.exists(keys.job_key(job.id))
                known = pipe.execute()
            jobs = [job for job, seen in zip(jobs, known, strict=True) if not seen]
            if not jobs:
                return []
            messages = [self.prepare(job) for job in jobs]
            self._check_backlog(jobs)
            for queue in dict.fromkeys(m.queue for m in messages):
                self.publisher.declare(queue)
            with self._redis.pipeline(transaction=True) as pipe:
                for m in messages:
                    self.publisher.stage(pipe, m, self.settings.redis.result_ttl_s)
                try:
                    pipe.execute()
                except (redis.exceptions.OutOfMemoryError, redis.exceptions.ExecAbortError) as exc:
                    raise RedisFull(0, len(messages), exc) from None
        return [job.id for job in jobs]

    def _check_backlog(self, jobs: list[AnyJob]) -> None:
        """``QueueFull`` if adding ``jobs`` would pass a model's ``queue.max_backlog``; one round
        trip, and none at all when no model has a limit."""
        adding: dict[str, int] = {}
        for job in jobs:
            if self.settings.queue.max_backlog_for(job.model):
                adding[job.model] = adding.get(job.model, 0) + 1
        if not adding:
            return
        depths = self._depths(list(adding))
        for model, n in adding.items():
            limit = self.settings.queue.max_backlog_for(model)
            depth = sum(depths[model].values())
            if depth + n > limit:
                raise QueueFull(model, depth, limit, n)

    def _depths(self, models: list[str]) -> dict[str, dict[int, int]]:
        """Jobs waiting per model and priority, in one round trip."""
        return backlog.depths(self._redis, models)

    @contextlib.contextmanager
    def _reaching_redis(self) -> Iterator[None]:
        """Redis unreachable, whichever library noticed, as one ``BrokerUnavailable``."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
            raise BrokerUnavailable(self.settings.redis.url, exc) from None

    def models(self) -> list[ModelInfo]:
        """The models live workers serve now (from their heartbeats), as ``/v1/models`` lists them."""
        with self._reaching_redis():
            return models_of(self._workers())

    def prepare(self, job: AnyJob) -> Outgoing:
        """The message ``submit`` sends for ``job``: validated, its priority and deadline decided,
        its images moved to blobs. Sync and asyncio clients send the same."""
        # Re-validate: a model mutated after construction must not reach the wire unchecked.
        job = type(job).model_validate(job.model_dump())
        payload = job.model_dump(mode="json")
        # What the job left to settings is decided here, once: the worker sees a priority and
        # an absolute deadline (a timeout counts from now, the submit).
        priority = job.priority if job.priority is not None else self.settings.queue.default_priority
        timeout_s = job.timeout_s or self.settings.queue.default_timeout_s_for(job.model)
        deadline = job.deadline or (time.time() + timeout_s if timeout_s else None)
        payload.update(priority=priority, deadline=deadline, timeout_s=None)
        blobs: list[tuple[str, bytes]] = []
        if isinstance(job, ChatJob):
            blobs = move_images_to_blobs(job, payload, self.settings.images)
        record: dict[str, str | int | float] = {"model": job.model, "kind": job.kind, "priority": priority,
                                                "state": "queued"}
        if deadline is not None:
            record["deadline"] = repr(deadline)
        return Outgoing(keys.GENERATE_TASK, job.id, keys.queue_for(job.model), payload, self._argsrepr(job), blobs,
                        priority=priority, deadline=deadline, record=record)

    def _argsrepr(self, job: AnyJob) -> str:
        """What Flower and worker logs show: the job's head, never a whole prompt."""
        limit = self.settings.producer.argsrepr_chars
        if isinstance(job, CompletionJob):
            body = job.prompt if isinstance(job.prompt, str) else f"<{len(job.prompt)} token ids>"
        else:
            body = " | ".join(
                f"{m.role}: {m.content if isinstance(m.content, str) else ' '.join(_part_repr(p) for p in m.content)}"
                for m in job.messages
            )
        if len(body) > limit:
            body = body[:limit] + f"... ({len(body)} chars)"
        return f"{job.kind} {job.model} max_tokens={job.sampling.max_tokens}: {body}"

    # -- controlling jobs --------------------------------------------------------------

    def cancel(self, job_id: str) -> str:
        """Cancel a job, queued or running; returns what happened, in words.

        * ``"cancelled while queued"``: it will never run; its producer hears ``JobCancelled`` now.
        * ``"cancelling: running on <worker>"``: its worker aborts it in the engine (within an
          engine step); its producer hears ``JobCancelled`` with the output produced until then.
        * ``"already finished: <state>"`` / ``"unknown job"``: nothing changed.

        The cancel is kept in Redis (``vqueue:cancel:<id>``), so a worker that picks the job up
        later, or again after a restart, skips it too.
        """
        return self.cancel_many([job_id])[job_id]

    def cancel_many(self, job_ids: Iterable[str]) -> dict[str, str]:
        """``cancel`` for each job, in one pipelined round trip; returns job id -> what happened."""
        job_ids = list(dict.fromkeys(job_ids))
        ttl = self.settings.redis.result_ttl_s
        now = time.time()
        with self._reaching_redis(), self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                meta = revoked_meta(job_id, "cancelled", now)
                self._cancel(keys=[keys.result_key(job_id), keys.attempt_key(job_id), keys.cancel_key(job_id),
                                   keys.job_key(job_id)],
                             args=[ttl, meta, job_id, keys.CANCEL_CHANNEL, repr(now)], client=pipe)
            replies = pipe.execute()
        return {job_id: cancel_said(job_id, reply) for job_id, reply in zip(job_ids, replies, strict=True)}

    def purge(self, model: str) -> list[str]:
        """Empty ``model``'s queue: every waiting job ends cancelled ("purged") and its producer
        hears ``JobCancelled``. Jobs already running are left alone. Returns the purged ids."""
        prefix, suffix = _meta_template(revoked_error("purged"))
        purged: list[str] = []
        with self._reaching_redis():
            for name in keys.queue_lists(model).values():
                while True:
                    ids = self._purge(keys=[name], args=[self.settings.redis.result_ttl_s, 1000, prefix, suffix,
                                                         repr(time.time()), keys.RESULT_KEY_PREFIX,
                                                         keys.CANCEL_KEY_PREFIX, keys.JOB_KEY_PREFIX])
                    if not ids:
                        break
                    purged.extend(i.decode() for i in ids)
        return purged

    def job(self, job_id: str) -> JobRecord:
        """Everything known about one job: its state, attempts, timeline and token counts.

        Raises ``JobNotFound`` for an id Redis knows nothing about.
        """
        with self._reaching_redis(), self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.job_key(job_id)).get(keys.result_key(job_id)).get(keys.attempt_key(job_id))
            raw_record, raw_meta, attempts = pipe.execute()
        record = records.decode(raw_record)
        outcome = decode_meta(job_id, raw_meta)
        if not record and raw_meta is None and attempts is None:
            raise JobNotFound(job_id, f"no job {job_id} in Redis: never submitted, or finished more than "
                                      f"redis.result_ttl_s ({self.settings.redis.result_ttl_s} s) ago")
        fields = records.fields_of(record)
        if outcome is not None:
            state = state_of(outcome)
        else:
            state = "running" if record.get("state") == "running" or (attempts and not record) else "queued"
            if record.get("state") == "cancelled":
                state = "cancelled"
        result = outcome if isinstance(outcome, JobResult) else getattr(outcome, "partial", None)
        if result is not None:
            t = result.timings
            fields.update(model=result.model, kind=result.kind, enqueued_at=t.enqueued_at, picked_up_at=t.started_at,
                          handed_at=t.handed_at, scheduled_at=t.scheduled_at, first_token_at=t.first_token_at,
                          finished_at=t.finished_at, worker=result.worker, usage=result.usage,
                          finish_reason=result.finish_reason)
        elif raw_meta is not None:
            date_done = json.loads(raw_meta).get("date_done")
            fields["finished_at"] = _epoch(date_done) if date_done else fields["finished_at"]
        if isinstance(outcome, JobFailed):
            fields["error"] = f"{outcome.error_type}: {outcome.error}"
        return JobRecord(id=job_id, state=state, **fields)

    def queue_stats(self, model: str | None = None) -> list[QueueStats]:
        """Each model's queue (or ``model``'s only): jobs waiting by priority, the oldest one's
        wait, its live workers with their jobs in flight and completions per second."""
        with self._reaching_redis():
            workers = self._workers()
            models = [model] if model else sorted({w.served_name for w in workers} | set(self._queued_models()))
            backlogs = {b.model: b for b in backlog.read(self._redis, models)}
        out = []
        for m in models:
            mine = sorted((w for w in workers if w.served_name == m), key=lambda w: w.hostname)
            loads = [WorkerLoad(hostname=w.hostname, in_flight=w.in_flight, max_in_flight=w.max_in_flight,
                                completions_per_s=w.completions_per_s) for w in mine]
            out.append(QueueStats(
                model=m, waiting_by_priority={p: n for p, n in backlogs[m].waiting_by_priority.items() if n},
                waiting=backlogs[m].waiting, oldest_waiting_s=backlogs[m].oldest_waiting_s,
                max_backlog=self.settings.queue.max_backlog_for(m), workers=loads,
                in_flight=sum(w.in_flight for w in loads), completions_per_s=sum(w.completions_per_s for w in loads),
            ))  # fmt: skip
        return out

    def _queued_models(self) -> list[str]:
        names = {keys.queue_of_list(q.decode()) for q in self._redis.scan_iter(match=f"{keys.QUEUE_PREFIX}*",
                                                                               count=1000)}  # fmt: skip
        return [n[len(keys.QUEUE_PREFIX):] for n in names]

    def _workers(self) -> list[WorkerInfo]:
        names = list(self._redis.scan_iter(match=f"{keys.WORKER_KEY_PREFIX}*", count=1000))
        return [WorkerInfo.model_validate_json(raw) for raw in self._redis.mget(names) if raw] if names else []

    def retry_dead(self, job_id: str) -> str:
        """Submit a quarantined job again, as a new job (its id is returned); its dead-letter
        entry is removed. Its engine-death count starts again from 0."""
        with self._reaching_redis():
            raw = self._redis.lrange(keys.DEAD_LETTERS_KEY, 0, -1)
        for entry_raw in raw:
            entry = DeadLetter.model_validate_json(entry_raw)
            if entry.job_id != job_id:
                continue
            if entry.kind != "quarantined" or len(base64.b64decode(entry.raw_b64)) != entry.raw_size:
                raise ValueError(f"dead letter {job_id} is an unreadable message ({entry.reason}); it cannot be "
                                 "submitted again")
            payload = json.loads(base64.b64decode(entry.raw_b64))
            payload.update(id=uuid.uuid4().hex, created_at=time.time(), deadline=None)
            new_id = self.submit(parse_job(payload))
            with self._reaching_redis():
                self._redis.lrem(keys.DEAD_LETTERS_KEY, 1, entry_raw)
            return new_id
        raise KeyError(f"no dead letter for job {job_id}; `vqueue dead` lists them")

    def purge_dead(self) -> int:
        """Empty the dead-letter list; returns how many entries it held."""
        with self._reaching_redis(), self._redis.pipeline() as pipe:
            pipe.llen(keys.DEAD_LETTERS_KEY).delete(keys.DEAD_LETTERS_KEY)
            n, _ = pipe.execute()
        return int(n)

    # -- reading results ---------------------------------------------------------------

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """The job's result, waiting up to ``timeout`` seconds (default from settings)."""
        for outcome in self.as_completed([job_id], timeout=timeout):
            if isinstance(outcome, JobFailed):
                raise outcome
            return outcome
        raise AssertionError("unreachable: as_completed yields or raises")

    def stream(self, job_id: str, timeout: float | None = None) -> Iterator[StreamChunk]:
        """Yield a streaming job's output as it is produced, one ``StreamChunk`` per engine step
        (``text`` is the new text only), until the job ends; ``timeout`` (seconds, default
        ``producer.default_timeout_s``) bounds the whole wait, then ``JobTimeout``.

        The job must have been submitted with ``stream=True``. Reading starts at the stream's
        first entry, so a reader that attaches late (or again) still gets everything. A job that
        ends other than succeeded raises its error as ``result`` does (``JobFailed``,
        ``JobCancelled``, ``JobExpired``, with ``.partial``) after its last chunks. Where a
        worker died mid-job, the job starts over: chunks then come with the next ``attempt``
        from its first token again, and the earlier attempt's text is to be discarded.
        ``result`` (after the stream ends) has the usage and timings. A job that succeeded
        without writing a stream (not submitted with ``stream=True``) raises ``JobFailed`` with
        ``error_type`` "NotStreamed" once it has finished.
        """
        timeout = self.settings.producer.default_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        key = keys.stream_key(job_id)
        last = "0-0"
        ended_at: float | None = None  # when the job's outcome was first seen stored with no stream end
        while True:
            now = time.monotonic()
            if now >= deadline:
                with self._reaching_redis():
                    raise JobTimeout(job_id, self._where_is(job_id, timeout, 1))
            block_ms = max(1, int(min(deadline - now, self.settings.producer.poll_interval_s) * 1000))
            try:
                reply = self._redis.xread({key: last}, count=_XREAD_COUNT, block=block_ms)
                # Quiet for a while: has the job ended without (yet) a stream end? A job cancelled
                # or expired while queued never streams; a worker that lost Redis drops entries.
                outcome = None if reply else decode_meta(job_id, self._redis.get(keys.result_key(job_id)))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis restarting: the stream outlives it (AOF); read on from the last entry seen.
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(self.settings.redis.url, exc) from None
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            if not reply:
                done, ended_at = streams.after_quiet(job_id, outcome, last != "0-0", ended_at, time.monotonic())
                if done:
                    return
                continue
            for entry_id, fields in reply[0][1]:
                last = entry_id
                entry = streams.decode_entry(fields)
                if isinstance(entry, StreamEnd):
                    if entry.outcome != "succeeded":
                        raise self._stream_failure(job_id, entry)
                    return
                yield entry

    def _stream_failure(self, job_id: str, end: StreamEnd) -> JobFailed:
        """The error of a job whose stream ended ``end.outcome``, read from its stored outcome."""
        with self._reaching_redis():
            outcome = decode_meta(job_id, self._redis.get(keys.result_key(job_id)))
        if isinstance(outcome, JobFailed):
            return outcome
        # The stored outcome is gone (older than redis.result_ttl_s) or unreadable: say what the stream said.
        message = f"the job's stream ended {end.outcome}; its stored outcome is gone"
        if end.outcome == "cancelled":
            return JobCancelled(job_id, message)
        if end.outcome == "expired":
            return JobExpired(job_id, message)
        return JobFailed(job_id, "Unknown", message)

    def as_completed(self, job_ids: Iterable[str], timeout: float | None = None) -> Iterator[JobResult | JobFailed]:
        """Yield each job's ``JobResult`` (or ``JobFailed``) as it finishes.

        Listens on the Redis channels Celery's backend publishes each result to, so a result
        arrives the moment it is written; an MGET sweep every ``producer.poll_interval_s``
        is the safety net. Raises ``JobTimeout`` naming the first unfinished job when
        ``timeout`` runs out.
        """
        timeout = self.settings.producer.default_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self.watcher() as watcher:
            watcher.add(job_ids)
            while watcher.pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    first = watcher.pending_ids()[0]
                    raise JobTimeout(first, self._where_is(first, timeout, watcher.pending))
                try:
                    yield from watcher.wait(remaining)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    # Redis restarting: results written before or after it are all still read
                    # (stored results outlive a restart with AOF); wait it out until the deadline.
                    if time.monotonic() >= deadline:
                        raise BrokerUnavailable(self.settings.redis.url, exc) from None
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def watcher(self) -> OutcomeWatcher:
        """A watcher of job outcomes on this client's Redis (``producer.watch``): ``add`` job ids
        whenever, ``wait`` for those stored. For callers whose set of jobs changes as they go
        (a batch file submits more as earlier lines finish); ``as_completed`` is built on it."""
        return OutcomeWatcher(self._redis, self.settings.producer.poll_interval_s)

    def heartbeat(self, hostname: str) -> tuple[WorkerInfo, float] | None:
        """Worker ``hostname``'s announcement and the seconds since it last renewed it, or None
        once it is gone (it expires ``keys.HEARTBEAT_TTL_BEATS`` beats after the last renewal).

        The age is read from the key's remaining TTL, so it assumes the worker runs with this
        client's ``worker.heartbeat_s`` (the same settings, as in a health check beside it)."""
        with self._reaching_redis(), self._redis.pipeline(transaction=False) as pipe:
            raw, ttl_ms = pipe.get(keys.worker_key(hostname)).pttl(keys.worker_key(hostname)).execute()
        if raw is None:
            return None
        full_ms = self.settings.worker.heartbeat_s * keys.HEARTBEAT_TTL_BEATS * 1000
        return WorkerInfo.model_validate_json(raw), max(0.0, (full_ms - max(ttl_ms, 0)) / 1000)

    def state(self, job_id: str) -> str:
        """The job's Celery state: PENDING (queued or unknown), STARTED (a worker took it), SUCCESS,
        FAILURE, REVOKED (cancelled or expired). ``job`` says more."""
        with self._reaching_redis():
            raw, attempts = self._redis.mget([keys.result_key(job_id), keys.attempt_key(job_id)])
        if raw is not None:
            return json.loads(raw)["status"]
        return "STARTED" if attempts is not None else "PENDING"

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Messages no worker could run (``vqueue:dead-letters``), newest first."""
        with self._reaching_redis():
            raw = self._redis.lrange(keys.DEAD_LETTERS_KEY, 0, limit - 1)
        return [DeadLetter.model_validate_json(r) for r in raw]

    def queue_length(self, model: str) -> int:
        """Jobs waiting in ``model``'s queue (all priorities), not yet taken by any worker."""
        with self._reaching_redis():
            return sum(self._depths([model])[model].values())

    def _where_is(self, job_id: str, timeout: float, n_pending: int) -> str:
        state = self.state(job_id)
        others = f" ({n_pending - 1} other jobs also unfinished)" if n_pending > 1 else ""
        if state == "STARTED":
            return f"job {job_id} is still running after {timeout:g} s{others}; wait longer or raise the timeout."
        models = sorted(self._queued_models())
        waiting = ", ".join(f"{keys.queue_for(m)} ({self.queue_length(m)} waiting)" for m in models) or "none"
        return (
            f"job {job_id} has no result after {timeout:g} s and no worker has started it{others}. "
            f"Queues with waiting jobs: {waiting}. If its model's queue is listed, no worker serving that "
            f"model is keeping up or running: start one with VQUEUE_MODEL__SERVED_NAME=<model> celery -A worker worker."
        )


def models_of(workers: list[WorkerInfo]) -> list[ModelInfo]:
    """Workers' announcements grouped by served model, as ``/v1/models`` lists them."""
    by_model: dict[str, list[WorkerInfo]] = {}
    for w in workers:
        by_model.setdefault(w.served_name, []).append(w)
    return [
        ModelInfo(id=name, source=ws[0].source, max_model_len=min(w.max_model_len for w in ws),
                  modalities=sorted(set.intersection(*(set(w.modalities) for w in ws))),
                  workers=sorted(w.hostname for w in ws), started_at=min(w.started_at for w in ws))
        for name, ws in sorted(by_model.items())
    ]  # fmt: skip


def cancel_said(job_id: str, reply: list) -> str:
    """What ``records.CANCEL`` replied, in words (sync and asyncio clients alike)."""
    what = reply[0].decode()
    if what == "finished":
        outcome = decode_meta(job_id, reply[1])
        return f"already finished: {state_of(outcome) if outcome is not None else 'unknown'}"
    if what == "running":
        return f"cancelling: running on {reply[1].decode()}"
    return {"queued": "cancelled while queued", "unknown": "unknown job"}[what]


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _epoch(iso: str) -> float | None:
    try:
        at = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def _meta_template(error: dict) -> tuple[str, str]:
    """Celery's REVOKED meta as the JSON before and after its task id (the purge script fills it in)."""
    head = json.dumps({"status": "REVOKED", "result": error, "traceback": None, "children": [],
                       "date_done": _iso(time.time())})
    return head[:-1] + ', "task_id": ', "}"


def _part_repr(part: Any) -> str:
    # Never an image's bytes: a 10 MB data URI must not reach Flower or the logs.
    return part.text if part.type == "text" else "<image>"
