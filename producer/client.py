"""The producer's Python API: submit jobs, read their results back from Redis."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import redis
from kombu.exceptions import OperationalError

from producer import keys
from producer.errors import BrokerUnavailable, JobFailed, JobTimeout, ModelNotServed
from producer.images import move_images_to_blobs
from producer.outcomes import decode_meta
from producer.protocol import ChatJob, CompletionJob, DeadLetter, JobResult, ModelInfo, WorkerInfo
from producer.settings import Settings, get_settings
from producer.transport import JobPublisher, Outgoing, make_celery

_MGET_CHUNK = 1000

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
        self._redis = redis.Redis.from_url(self.settings.redis.url)
        self._publisher = JobPublisher(self._celery, self._redis)

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

        Every job is checked before any is sent: one bad job raises and enqueues nothing.
        """
        jobs = list(jobs)
        messages = [self._message(job) for job in jobs]
        if if_unserved == "fail":
            served = {m.id for m in self.models()}
            for model in dict.fromkeys(j.model for j in jobs):
                if model not in served:
                    raise ModelNotServed(model, sorted(served))
        with self._reaching_redis():
            self._publisher.publish(messages, blob_ttl_s=self.settings.redis.result_ttl_s)
        return [job.id for job in jobs]

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
            names = list(self._redis.scan_iter(match=f"{keys.WORKER_KEY_PREFIX}*", count=1000))
            workers = [WorkerInfo.model_validate_json(raw) for raw in self._redis.mget(names) if raw] if names else []
        by_model: dict[str, list[WorkerInfo]] = {}
        for w in workers:
            by_model.setdefault(w.served_name, []).append(w)
        return [
            ModelInfo(id=name, source=ws[0].source, max_model_len=min(w.max_model_len for w in ws),
                      modalities=sorted(set.intersection(*(set(w.modalities) for w in ws))),
                      workers=sorted(w.hostname for w in ws), started_at=min(w.started_at for w in ws))
            for name, ws in sorted(by_model.items())
        ]  # fmt: skip

    def _message(self, job: AnyJob) -> Outgoing:
        # Re-validate: a model mutated after construction must not reach the wire unchecked.
        job = type(job).model_validate(job.model_dump())
        payload = job.model_dump(mode="json")
        blobs: list[tuple[str, bytes]] = []
        if isinstance(job, ChatJob):
            blobs = move_images_to_blobs(job, payload, self.settings.images)
        return Outgoing(keys.GENERATE_TASK, job.id, keys.queue_for(job.model), payload, self._argsrepr(job), blobs)

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

    # -- reading results ---------------------------------------------------------------

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """The job's result, waiting up to ``timeout`` seconds (default from settings)."""
        for outcome in self.as_completed([job_id], timeout=timeout):
            if isinstance(outcome, JobFailed):
                raise outcome
            return outcome
        raise AssertionError("unreachable: as_completed yields or raises")

    def as_completed(self, job_ids: Iterable[str], timeout: float | None = None) -> Iterator[JobResult | JobFailed]:
        """Yield each job's ``JobResult`` (or ``JobFailed``) as it finishes.

        Listens on the Redis channels Celery's backend publishes each result to, so a result
        arrives the moment it is written; an MGET sweep every ``producer.poll_interval_s``
        is the safety net. Raises ``JobTimeout`` naming the first unfinished job when
        ``timeout`` runs out.
        """
        timeout = self.settings.producer.default_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pending = dict.fromkeys(job_ids)
        outage: BaseException | None = None
        while pending:
            try:
                yield from self._listen(pending, deadline, timeout)
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis restarting: results written before or after it are all still read
                # (stored results outlive a restart with AOF); wait it out until the deadline.
                outage = exc
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(self.settings.redis.url, outage) from None
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _listen(self, pending: dict[str, None], deadline: float, timeout: float) -> Iterator[JobResult | JobFailed]:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            for chunk in _chunks(list(pending)):
                pubsub.subscribe(*(keys.result_key(j) for j in chunk))
            next_sweep = 0.0  # the first sweep finds results written before we subscribed
            while pending:
                now = time.monotonic()
                if now >= next_sweep:
                    yield from self._sweep(pending)
                    next_sweep = now + self.settings.producer.poll_interval_s
                    continue
                if now >= deadline:
                    first = next(iter(pending))
                    raise JobTimeout(first, self._where_is(first, timeout, len(pending)))
                message = pubsub.get_message(timeout=min(deadline, next_sweep) - now)
                if message is None or message["type"] != "message":
                    continue
                job_id = message["channel"].decode()[len(keys.RESULT_KEY_PREFIX) :]
                outcome = decode_meta(job_id, message["data"])
                if outcome is not None and job_id in pending:
                    del pending[job_id]
                    yield outcome
        finally:
            with contextlib.suppress(redis.RedisError):
                pubsub.close()

    def _sweep(self, pending: dict[str, None]) -> Iterator[JobResult | JobFailed]:
        """Yield (and drop from ``pending``) every job whose result is already stored."""
        for chunk in _chunks(list(pending)):
            for job_id, raw in zip(chunk, self._redis.mget([keys.result_key(j) for j in chunk]), strict=True):
                outcome = decode_meta(job_id, raw)
                if outcome is not None:
                    del pending[job_id]
                    yield outcome

    def state(self, job_id: str) -> str:
        """The job's state: PENDING (queued or unknown), STARTED (a worker took it), SUCCESS, FAILURE."""
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
        """Jobs waiting in ``model``'s queue, not yet taken by any worker."""
        return int(self._redis.llen(keys.queue_for(model)))

    def _where_is(self, job_id: str, timeout: float, n_pending: int) -> str:
        state = self.state(job_id)
        others = f" ({n_pending - 1} other jobs also unfinished)" if n_pending > 1 else ""
        if state == "STARTED":
            return f"job {job_id} is still running after {timeout:g} s{others}; wait longer or raise the timeout."
        queues = [q.decode() for q in self._redis.scan_iter(match=f"{keys.QUEUE_PREFIX}*", count=1000)]
        waiting = ", ".join(f"{q} ({self._redis.llen(q)} waiting)" for q in sorted(queues)) or "none"
        return (
            f"job {job_id} has no result after {timeout:g} s and no worker has started it{others}. "
            f"Queues with waiting jobs: {waiting}. If its model's queue is listed, no worker serving that "
            f"model is keeping up or running: start one with VQUEUE_MODEL__SERVED_NAME=<model> celery -A worker worker."
        )


def _chunks(items: list[str], size: int = _MGET_CHUNK) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _part_repr(part: Any) -> str:
    # Never an image's bytes: a 10 MB data URI must not reach Flower or the logs.
    return part.text if part.type == "text" else "<image>"
