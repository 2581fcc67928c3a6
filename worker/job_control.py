"""The worker's side of job control: pickup, cancels, stopped jobs, engine deaths, quarantine.

* **Pickup** (``pick_up``): one Lua script, the task's one Redis round trip before the engine:
  it returns a stored result (a redelivered finished job is never run twice), or "cancelled"
  (the job is skipped, its attempt counter never created), or counts the attempt and updates
  the job's record (``producer.records.PICK_UP``). Deadlines of queued jobs need nothing here:
  the message carries Celery's ``expires``, and Celery discards an expired message at
  pickup, REVOKED ("expired"), before the task runs.
* **Cancels of running jobs** (``CancelListener``): one pub/sub subscription per worker on
  ``vqueue:cancel``; the worker holding the job stops it in its engine (vLLM's ``abort``).
  Nothing polls per job. A running job's deadline is a timer in the engine process.
* **Stopped jobs** (``store_stopped``): their partial output is stored in Celery's REVOKED
  state (``producer.outcomes`` says why), written in place of the result Celery would write.
* **Engine deaths** (``record_death``): counted per job in its record; at
  ``worker.max_engine_deaths`` the job is quarantined instead of requeued.

The listener starts on ``worker_ready`` and stops on ``worker_shutdown`` (the handlers below;
this module is imported by ``worker.tasks``, which the worker loads before it is ready).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import redis
from celery import Task, signals, states
from celery.exceptions import Ignore, TaskRevokedError

from producer import connections, keys, records
from producer.protocol import DeadLetter, JobResult
from worker.celery_app import app, holder, settings
from worker.dead_letters import DeadLetters

log = logging.getLogger(__name__)

@cache
def _pick_up_script() -> Any:
    return app.backend.client.register_script(records.PICK_UP)


@dataclass
class Pickup:
    #: "run", "done" (finished before: ``meta`` is its stored result) or "cancelled".
    verdict: str
    attempt: int = 0
    enqueued_at: float | None = None
    meta: dict[str, Any] | None = None


def pick_up(job_id: str, worker: str) -> Pickup:
    """The job's verdict at pickup, in one Redis round trip (``producer.records.PICK_UP``)."""
    reply = _pick_up_script()(
        keys=[keys.attempt_key(job_id), keys.result_key(job_id), keys.cancel_key(job_id), keys.job_key(job_id)],
        args=[settings.redis.result_ttl_s, worker, repr(time.time())],
        client=app.backend.client,
    )
    verdict = reply[0].decode()
    if verdict == "done":
        return Pickup("done", meta=json.loads(reply[1]))
    if verdict == "cancelled":
        return Pickup("cancelled")
    return Pickup("run", attempt=int(reply[1]), enqueued_at=float(reply[2]) if len(reply) > 2 and reply[2] else None)


class Stopped(Ignore):
    """What the task raises once a stopped job's outcome is stored: Celery's ``Ignore`` (it
    writes nothing more), carrying the outcome ("cancelled" / "expired") and the partial
    result (a ``JobResult`` as JSON, or None) for the worker's metrics (``worker.metrics``)."""

    def __init__(self, outcome: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.partial = partial


def store_stopped(task: Task, job_id: str, reason: str, partial: JobResult | None) -> Stopped:
    """Store a stopped job's outcome in Celery's REVOKED state, as Celery's ``TaskRevokedError``
    (``reason`` "cancelled" / "expired", and the partial result), and tell Flower. Returns the
    ``Stopped`` for the task to raise.

    Celery would otherwise store the task's return value as SUCCESS: the task raises ``Ignore``
    after this, so this write takes the place of Celery's own (no extra round trip).
    """
    dumped = partial.model_dump(mode="json") if partial is not None else None
    args = (reason,) if dumped is None else (reason, dumped)
    task.backend.store_result(job_id, TaskRevokedError(*args), states.REVOKED, request=task.request)
    announce_revoked(task, expired=reason == "expired")
    return Stopped(reason, dumped)


def announce_revoked(task: Task, expired: bool) -> None:
    """Flower's "task-revoked" event (Celery sends none for a task that ends in ``Ignore``)."""
    if not app.conf.worker_send_task_events:
        return
    try:
        task.send_event("task-revoked", terminated=False, signum=None, expired=expired)
    except Exception:  # Flower's view only: never the job's outcome
        log.warning("could not send task-revoked for %s", task.request.id, exc_info=True)


def revoked_at_pickup(task: Task, meta: dict[str, Any]) -> Stopped:
    """A job whose stopped outcome was stored while it waited (``Client.cancel``, a purge) and that
    a worker now takes off the queue: its stored outcome stays; tell Flower, and return the
    ``Stopped`` (with the stored reason) for the task to raise."""
    announce_revoked(task, expired=False)
    error = meta.get("result")
    args = error.get("exc_message") if isinstance(error, dict) else None
    reason = args[0] if isinstance(args, list) and args else "cancelled"
    return Stopped("expired" if reason == "expired" else "cancelled")


def mark_cancelled(task: Task, job_id: str) -> Stopped:
    """A job cancelled while it ran here or elsewhere, picked up again with no stored outcome
    (its worker died before it could store one): it ends cancelled, without output. Returns
    the ``Stopped`` for the task to raise."""
    task.backend.mark_as_revoked(job_id, "cancelled", request=task.request)
    announce_revoked(task, expired=False)
    return Stopped("cancelled")


def record_death(job_id: str, reason: str) -> int:
    """Count an engine death the job was in; returns its deaths so far. The record goes back
    to "queued" (the job is handed back unless this was its last death)."""
    key = keys.job_key(job_id)
    with app.backend.client.pipeline(transaction=False) as pipe:
        pipe.hincrby(key, "engine_deaths", 1)
        pipe.hset(key, mapping={"last_death": reason, "state": "queued"})
        pipe.expire(key, settings.redis.result_ttl_s)
        deaths, _, _ = pipe.execute()
    return int(deaths)


def quarantine(job_id: str, payload: Any, queue: str, worker: str, reason: str, attempts: int) -> None:
    """The dead-letter entry of a quarantined job: its whole job, for ``vqueue dead retry``."""
    raw = json.dumps(payload).encode()
    entry = DeadLetter(kind="quarantined", queue=queue, job_id=job_id, error_type="Quarantined", reason=reason,
                       raw_b64=base64.b64encode(raw).decode(), raw_size=len(raw), at=time.time(), worker=worker,
                       attempts=attempts)  # fmt: skip
    DeadLetters(app.backend.client, lambda *_: None, worker=worker, max_entries=settings.worker.dead_letter_max,
                ttl_s=settings.redis.result_ttl_s).add(entry)  # fmt: skip
    log.error("quarantined job %s after %d attempts: %s", job_id, attempts, reason)


class CancelListener:
    """One pub/sub subscription per worker: each cancelled job id is stopped in the engine if
    it runs here. On every (re)subscription the jobs in the engine are checked against their
    cancel marks once, so a cancel published while this worker was cut off is not missed."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vqueue-cancels", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.CANCEL_CHANNEL)
                self._catch_up()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self._cancel(message["data"].decode(errors="replace"))
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); resubscribing", exc)
                self._stop.wait(1.0)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def _cancel(self, job_id: str) -> None:
        if holder.stop_job(job_id, "cancelled"):
            log.info("cancelling job %s: aborting it in the engine", job_id)

    def _catch_up(self) -> None:
        job_ids = holder.job_ids()
        if job_ids:
            marks = self._client.mget([keys.cancel_key(j) for j in job_ids])
            for job_id, mark in zip(job_ids, marks, strict=True):
                if mark is not None:
                    self._cancel(job_id)


_listener: CancelListener | None = None


@signals.worker_ready.connect
def _start_listener(**_: Any) -> None:
    global _listener
    _listener = CancelListener(connections.redis_client(settings))
    _listener.start()


@signals.worker_shutdown.connect
def _stop_listener(**_: Any) -> None:
    if _listener is not None:
        _listener.stop()
