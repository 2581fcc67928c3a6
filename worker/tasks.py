"""The Celery task: thin. Parse the job, run it on the engine holder, return the result."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject
from celery.worker import state
from pydantic import ValidationError

from producer import keys
from producer.errors import EngineDead, InvalidJob, WireError
from producer.protocol import ChatJob, CompletionJob, JobResult, parse_job
from worker import failures
from worker.celery_app import app, holder, settings

log = logging.getLogger(__name__)


def invalid_job_from(exc: ValidationError) -> InvalidJob:
    """The first validation error as an ``InvalidJob`` naming its field."""
    err = exc.errors()[0]
    # A missing or unknown "kind" fails the union's tag check, which pydantic reports at the root.
    tag = err["type"] in ("union_tag_invalid", "union_tag_not_found")
    loc = err["loc"][1:] if err["loc"][:1] in (("completion",), ("chat",)) else err["loc"]  # the union's tag
    field = "kind" if tag else ".".join(str(p) for p in loc) or "job"
    more = f" (and {exc.error_count() - 1} more errors)" if exc.error_count() > 1 else ""
    return InvalidJob(field, f"{err['msg']}{more}")


def record_attempt(job_id: str) -> tuple[int, dict[str, Any] | None]:
    """Count the starts of this job (1 on first delivery, 2 after a redelivery, ...), and return
    its stored result if an earlier delivery already finished it; one Redis round trip."""
    key = keys.attempt_key(job_id)
    with app.backend.client.pipeline() as pipe:
        pipe.incr(key).expire(key, settings.redis.result_ttl_s).get(keys.result_key(job_id))
        attempt, _, done = pipe.execute()
    meta = json.loads(done) if done else None
    return int(attempt), meta["result"] if meta and meta.get("status") == "SUCCESS" else None


def forget_blobs(job: CompletionJob | ChatJob) -> None:
    urls = job.image_urls() if isinstance(job, ChatJob) else []
    blob_keys = [key for key in map(keys.blob_key_of, urls) if key is not None]
    if blob_keys:
        app.backend.client.delete(*blob_keys)


# The job is validated here rather than with Celery's pydantic=True so that a bad job ends
# as an InvalidJob naming the field (not a pydantic traceback), and the worker decides.
# Every ending goes through worker.failures: a typed WireError Celery stores (throws= keeps
# them out of the error log), or EngineDead, which hands the job back.
@app.task(name=keys.GENERATE_TASK, bind=True, throws=(WireError,))
def generate(self: Task, payload: Any) -> dict[str, Any]:
    started_at = time.time()
    try:
        job = parse_job(payload)
    except ValidationError as exc:
        raise invalid_job_from(exc) from None
    try:
        attempt, earlier = record_attempt(job.id)
    except redis.RedisError as exc:
        # Redis is away: hand the job back. If that fails too, it stays in `unacked` and its
        # lease (no longer renewed once this request is done) brings it back.
        raise Reject(f"Redis unreachable ({exc}); the job goes back to the queue", requeue=True) from None
    if earlier is not None:
        return earlier  # delivered again after it finished (e.g. a lost ack): never run twice
    try:
        result: JobResult = holder.run_job(job, started_at=started_at, worker=self.request.hostname, attempt=attempt)
    except Exception as exc:
        error = failures.classify(exc)
        if isinstance(error, EngineDead):
            # Hand the job back and stop this worker with a failure code, so that its
            # supervisor starts a fresh one; no job is failed for the engine's death. Its
            # image blobs stay for the next attempt.
            log.error("%s; requeueing job %s and stopping the worker", error, job.id)
            state.should_stop = os.EX_SOFTWARE
            raise Reject(str(error), requeue=True) from None
        forget_blobs(job)
        raise error from None
    forget_blobs(job)
    return result.model_dump(mode="json")
