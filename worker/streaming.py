"""Writing streaming jobs' output to their Redis streams (``vqueue:stream:<job id>``).

The engine process sends the chunks of streamed jobs (``job.stream``), encoded, over the
worker's channel, one frame per engine step (``worker.engine_process.ChunkBatcher``); the
channel's reader thread hands them to ``StreamWriter.add``, which only queues them: the
reader, which wakes every job's pool thread, never waits on Redis. One writer thread drains
the queue and writes what it holds in one pipelined round trip: one XADD per chunk (one
engine step of one job; steps the engine process's loop fell behind on come merged, as
vLLM's DELTA outputs do), one EXPIRE per stream. A job's stream end is queued by
``task_postrun`` (below), after Celery stored the job's outcome, behind the job's chunks:
a reader that sees the end can read the result.

Writes never fail a job: with Redis away, the entries are dropped and logged (the result,
which Celery writes and retries, is what matters; ``Client.stream`` ends a stream whose end
was lost once the job's outcome is stored). Not retried, so that no entry is ever written
twice: a stream that lost entries has a gap, and its result is the whole output.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import redis
from celery import signals, states

from producer import keys, streams
from producer.errors import JobCancelled, JobExpired
from producer.outcomes import decode_meta
from producer.protocol import StreamOutcome

log = logging.getLogger(__name__)

#: Lists of entries (one engine step's each) waiting to be written at most; past it (Redis
#: too slow or hung) new ones are dropped.
MAX_WAITING = 10_000
#: Entries written in one round trip at most (a step's list is never split).
BATCH = 1024
#: A Redis failure is logged at most this often (a down Redis fails every batch).
LOG_EVERY_S = 10.0


class StreamWriter:
    """Queues stream entries from any thread; one thread writes them to Redis, in order.

    :param ttl_s: each stream's TTL (``redis.result_ttl_s``), renewed with each write.

    ``start`` (the worker calls it once it is ready) hands it the worker's Redis client and
    starts its thread; entries queued before wait for it. Not at the first entry: starting a
    thread and building a Redis client there delayed a worker's first streamed chunk by
    0.5-1 s on a busy machine.
    """

    def __init__(self, ttl_s: int) -> None:
        self._ttl_s = ttl_s
        self._client: redis.Redis | None = None
        #: Entries to write, in lists as they came (one engine step's), and ``flush`` marks (an
        #: Event set once everything before it is written).
        self._queue: queue.Queue[list[tuple[str, dict[str, str]]] | threading.Event] = queue.Queue(MAX_WAITING)
        self._thread = threading.Thread(target=self._run, name="vqueue-streams", daemon=True)
        self._dropped = 0
        self._last_log = 0.0

    def start(self, client: redis.Redis) -> None:
        """Write with ``client`` (its pool is shared and thread-safe) from now on."""
        self._client = client
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Entries not written (Redis away, or too many waiting) since the worker started."""
        return self._dropped

    def end(self, job_id: str, outcome: StreamOutcome) -> None:
        self.add([(job_id, streams.encode_end(outcome))])

    def add(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Queue entries to write in this order, each a job id and its entry's fields
        (``producer.streams``' encoding)."""
        try:
            self._queue.put_nowait(entries)
        except queue.Full:
            self._dropped += len(entries)
            self._log_failure(f"{MAX_WAITING} lists of stream entries wait to be written (Redis slow or away); "
                              f"dropping new ones ({self._dropped} entries so far)")

    def flush(self, timeout_s: float) -> bool:
        """Wait until every entry queued so far is written (or dropped); False after ``timeout_s``.
        The worker calls it at shutdown: the writer is a daemon thread, and the stream ends of
        the last jobs a warm shutdown let finish are still on their way."""
        if self._client is None:
            return True  # never started: the worker never got ready, nothing was streamed
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    def _run(self) -> None:
        while True:
            batch: list[tuple[str, dict[str, str]]] = []
            item = self._queue.get()
            while True:
                if isinstance(item, threading.Event):
                    self._write(batch)
                    batch = []
                    item.set()
                else:
                    batch.extend(item)
                if len(batch) >= BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[tuple[str, dict[str, str]]]) -> None:
        if not batch:
            return
        assert self._client is not None  # the thread runs only once started
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for job_id, fields in batch:
                    pipe.xadd(keys.stream_key(job_id), fields)  # type: ignore[arg-type]
                for job_id in dict.fromkeys(job_id for job_id, _ in batch):
                    pipe.expire(keys.stream_key(job_id), self._ttl_s)
                pipe.execute()
        except Exception as exc:  # RedisError above all; whatever it is, this thread must live on
            self._dropped += len(batch)
            self._log_failure(f"could not write {len(batch)} stream entries ({exc}); dropped "
                              f"({self._dropped} so far); the jobs' results are unaffected")

    def _log_failure(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning(message)


#: The worker's writer, set by ``worker.celery_app`` (None in processes that are no worker).
writer: StreamWriter | None = None


def outcome_of(state: str, job_id: str, client: redis.Redis) -> StreamOutcome | None:
    """How a streamed job's task ended, in stream-end terms; None: it did not end (handed back
    to the queue, it runs again and its next attempt streams on)."""
    if state == states.SUCCESS:
        return "succeeded"
    if state == states.FAILURE:
        return "failed"
    if state != states.IGNORED:  # REJECTED: requeued (engine died, Redis away at pickup)
        return None
    # Ignored: its outcome was stored before (stopped: cancelled or expired; or it had ended
    # already when it was delivered again); read which. A rare path: one GET.
    outcome = decode_meta(job_id, client.get(keys.result_key(job_id)))
    if isinstance(outcome, JobExpired):
        return "expired"
    if isinstance(outcome, JobCancelled):
        return "cancelled"
    return "succeeded" if outcome is not None and not isinstance(outcome, Exception) else "failed"


def end_stream(task_id: str, args: Any, state: str, client: redis.Redis) -> None:
    """Queue the stream end of a streamed job whose task just ended (after Celery stored its
    outcome); nothing for a job that is not streamed."""
    payload = args[0] if isinstance(args, list | tuple) and args else None
    if writer is None or not isinstance(payload, dict) or payload.get("stream") is not True:
        return
    try:
        outcome = outcome_of(state, task_id, client)
    except redis.RedisError as exc:
        log.warning("could not read job %s's outcome for its stream end (%s); the stream has no end", task_id, exc)
        return
    if outcome is not None:
        writer.end(task_id, outcome)


@signals.task_postrun.connect
def _on_postrun(task_id: str | None = None, task: Any = None, args: Any = None, state: str | None = None,
                **_: Any) -> None:
    # task_postrun runs after the outcome is stored (celery.app.trace), for every ending.
    if task is None or task.name != keys.GENERATE_TASK or task_id is None or state is None:
        return
    end_stream(task_id, args, state, task.backend.client)
