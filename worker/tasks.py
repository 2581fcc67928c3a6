"""The Celery task: thin. Parse the job, run it on the engine holder, return the result."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Reject
from celery.worker import state
from pydantic import ValidationError

from producer import keys
from producer.errors import EngineDead, InvalidJob, Quarantined, WireError
from producer.protocol import ChatJob, CompletionJob, JobResult, parse_job
from worker import failures, job_control
from worker.celery_app import app, holder, settings
from worker.results import JobStopped

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


def forget_blobs(job: CompletionJob | ChatJob) -> None:
    urls = job.image_urls() if isinstance(job, ChatJob) else []
    blob_keys = [key for key in map(keys.blob_key_of, urls) if key is not None]
    if blob_keys:
        app.backend.client.delete(*blob_keys)


# The job is validated here rather than with Celery's pydantic=True so that a bad job ends
# as an InvalidJob naming the field (not a pydantic traceback), and the worker decides.
# Every ending goes through worker.failures: a typed WireError Celery stores (throws= keeps
# them out of the error log), or EngineDead, which hands the job back. A job stopped early
# (cancelled, expired) is stored REVOKED by worker.job_control, and the task ends in its
# Stopped (Celery's Ignore, carrying the outcome for worker.metrics).
@app.task(name=keys.GENERATE_TASK, bind=True, throws=(WireError,))
def generate(self: Task, payload: Any) -> dict[str, Any]:
    started_at = time.time()
    try:
        job = parse_job(payload)
    except ValidationError as exc:
        raise invalid_job_from(exc) from None
    worker = self.request.hostname
    try:
        pickup = job_control.pick_up(job.id, worker)
    except redis.RedisError as exc:
        # Redis is away: hand the job back. If that fails too, it stays in `unacked` and its
        # lease (no longer renewed once this request is done) brings it back.
        raise Reject(f"Redis unreachable ({exc}); the job goes back to the queue", requeue=True) from None
    if pickup.verdict == "done":
        if pickup.meta.get("status") == "SUCCESS":
            return pickup.meta["result"]  # delivered again after it finished (e.g. a lost ack): never run twice
        if pickup.meta.get("status") == "REVOKED":  # cancelled or purged while it waited: ends here
            raise job_control.revoked_at_pickup(self, pickup.meta)
        raise Ignore()  # its outcome is stored already: keep it
    if pickup.verdict == "cancelled":
        raise job_control.mark_cancelled(self, job.id)
    try:
        result: JobResult = holder.run_job(job, started_at=started_at, worker=worker, attempt=pickup.attempt,
                                           enqueued_at=pickup.enqueued_at)
    except JobStopped as stopped:
        forget_blobs(job)
        raise job_control.store_stopped(self, job.id, stopped.outcome, None) from None
    except Exception as exc:
        error = failures.classify(exc)
        if isinstance(error, EngineDead):
            # Hand the job back and stop this worker with a failure code, so that its
            # supervisor starts a fresh one; no job is failed for the engine's death, unless
            # the engine died with it in worker.max_engine_deaths times. Its image blobs
            # stay for the next attempt (and for `vqueue dead retry`).
            state.should_stop = os.EX_SOFTWARE
            if error.handed:
                quarantined = _count_death(job.id, payload, str(error), pickup.attempt, worker)
                if quarantined is not None:
                    raise quarantined from None
            log.error("%s; requeueing job %s and stopping the worker", error, job.id)
            raise Reject(str(error), requeue=True) from None
        forget_blobs(job)
        raise error from None
    forget_blobs(job)
    if result.outcome != "succeeded":
        raise job_control.store_stopped(self, job.id, result.outcome, result)
    return result.model_dump(mode="json")


def _count_death(job_id: str, payload: Any, reason: str, attempt: int, worker: str) -> Quarantined | None:
    """Count this engine death against the job; at ``worker.max_engine_deaths`` the error that
    fails it for good (and its dead-letter entry), else None: it goes back to the queue."""
    limit = settings.worker.max_engine_deaths
    try:
        deaths = job_control.record_death(job_id, reason)
    except redis.RedisError:
        return None  # uncounted: it goes back and may run again, as before quarantine existed
    if deaths < limit:
        return None
    why = (f"the engine died {deaths} times with this job in it (worker.max_engine_deaths = {limit}), over "
           f"{attempt} attempts; the last: {reason}. It is not delivered again: `vqueue dead` lists it, "
           f"`vqueue dead retry {job_id}` submits it again")
    try:
        job_control.quarantine(job_id, payload, keys.queue_for(settings.model.served_name), worker, why, attempt)
    except redis.RedisError:
        log.warning("could not write the dead-letter entry of quarantined job %s", job_id, exc_info=True)
    return Quarantined(None, why)
