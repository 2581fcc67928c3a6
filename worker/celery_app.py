"""The worker's Celery app: ``celery -A worker worker`` finds it as ``worker.app``.

Importing this is cheap (Flower and ``celery inspect`` import it too): the engine is built
on ``worker_init``, before the worker takes any job, and shut down on ``worker_shutdown``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

from celery import signals
from kombu import Queue

from producer import keys
from producer.protocol import WorkerInfo
from producer.settings import get_settings
from producer.transport import make_celery
from worker import broker, result_backend, streaming
from worker.dead_letters import DeadLetters
from worker.engine import EngineHolder
from worker.leases import LeaseKeeper
from worker.metrics import WorkerMetrics
from worker.reaper import start_reaper
from worker.registry import Heartbeat

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings, name="vqueue-worker")
app.conf.update(
    include=["worker.tasks"],
    # One engine per process: prefork would start one per child and fight over the GPU.
    worker_pool="threads",
    # Each pool thread holds one job in the engine; this is the most jobs in flight.
    worker_concurrency=settings.worker.max_in_flight,
    # Reserve only as many jobs as there are free threads: enough to keep the engine full
    # (every thread has a job in vLLM), never a backlog parked in one worker's buffer while
    # other workers idle, and a crash hands back at most max_in_flight jobs.
    worker_prefetch_multiplier=1,
    # No job lost: ack after the result is written; a lost worker's jobs are delivered again.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # This worker consumes its served model's queue only.
    task_queues=[Queue(keys.queue_for(settings.model.served_name))],
    task_default_queue=keys.queue_for(settings.model.served_name),
    # Flower sees every job and its state without flags.
    worker_send_task_events=settings.worker.task_events,
    # No STARTED write to the result key: the job's attempt counter (one INCR the task
    # makes anyway) tells producers it started, and saves a Redis round trip per job.
    task_track_started=False,
    # Every pool thread may be in a Redis call at once (its pick-up, result, stream end), and
    # so may the heartbeat, lease, stream and metrics threads. Celery's result backend builds
    # redis-py's pool, which allows 100 connections by default: past that a call raised "Too
    # many connections", which Celery logged with its traceback and retried after a sleep,
    # thousands of times in one burst of 1000 jobs (the worker's intake halved).
    redis_max_connections=settings.worker.max_in_flight + 64,
    worker_hijack_root_logger=True,
)
# kombu's Redis transport (or its Sentinel one), but no message can stop the consumer
# (worker.broker says why).
app.conf.broker_transport = broker.transport_for(settings.redis.url)
# Celery's Redis result backend, its client read without a lock (worker.result_backend says why).
app.conf.result_backend = result_backend.url_for(settings.redis.url)

#: How long a stopping worker waits for its stream entries to be written.
STREAM_FLUSH_TIMEOUT_S = 5.0
# Streamed jobs' chunks go from the engine's results reader to one writer thread (worker.streaming).
stream_writer = streaming.writer = streaming.StreamWriter(settings.redis.result_ttl_s)
#: This worker's Prometheus metrics (served on metrics.port once the worker is ready).
metrics = WorkerMetrics(settings.model.served_name)
holder = EngineHolder(settings, blob_reader=lambda key: app.backend.client.get(key), on_chunks=stream_writer.add,
                      on_engine_stats=metrics.engine_stats)
_reaper: subprocess.Popen | None = None
_heartbeat: Heartbeat | None = None
_leases: LeaseKeeper | None = None


@signals.after_setup_logger.connect
def _quiet_per_job_lines(**_: Any) -> None:
    # Celery reads these levels once, when it builds the strategy and the tracer (after this).
    if not settings.worker.log_each_job:
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)


@signals.worker_init.connect
def _start_engine(sender: Any = None, **_: Any) -> None:
    log.info("vqueue worker: model %r from %s, queue %s, %d jobs in flight at most",
             settings.model.served_name, settings.model.source, keys.queue_for(settings.model.served_name),
             settings.worker.max_in_flight)
    global _reaper
    metrics.bind(getattr(sender, "hostname", None) or "unknown")
    sys.setswitchinterval(settings.worker.gil_switch_interval_s)
    _reaper = start_reaper()
    try:
        holder.start()
    except Exception as exc:
        # Celery logs and swallows a signal handler's Exception, and would then serve jobs
        # with no engine; a worker whose engine cannot start must exit instead.
        traceback.print_exc()
        _reaper.terminate()
        raise SystemExit(f"vqueue worker: the engine did not start ({type(exc).__name__}: {exc})") from exc


def prestart_pool_threads(executor: Any, n: int) -> None:
    """Start all ``n`` pool threads now, before the first job.

    The threads pool's ThreadPoolExecutor starts a thread per job while none is idle, so the
    first burst of jobs paid for up to ``worker.max_in_flight`` thread starts inside it.
    ``n`` tasks that wait for each other make it start them all at once, here.
    """
    if executor is None:
        return
    started = time.monotonic()
    barrier = threading.Barrier(n + 1)
    for _ in range(n):
        executor.submit(barrier.wait, 60)
    try:
        barrier.wait(60)
    except threading.BrokenBarrierError:
        log.warning("only some of the %d pool threads started before the first job", n)
        return
    log.info("%d pool threads started in %.2f s", n, time.monotonic() - started)


@signals.worker_ready.connect
def _announce(sender: Any = None, **_: Any) -> None:
    global _heartbeat, _leases
    limits = settings.engine.limit_mm_per_prompt
    info = WorkerInfo(
        hostname=sender.hostname, served_name=settings.model.served_name, source=settings.model.source,
        max_model_len=settings.engine.max_model_len, max_in_flight=settings.worker.max_in_flight,
        modalities=["text", *(m for m in ("image", "video") if holder.multimodal and limits.get(m, 0) > 0)],
        started_at=time.time(),
    )  # fmt: skip
    prestart_pool_threads(getattr(sender.pool, "executor", None), settings.worker.max_in_flight)
    if settings.metrics.port:
        metrics.serve(settings.metrics.host, settings.metrics.port)
    _heartbeat = Heartbeat(app.backend.client, info, settings.worker.heartbeat_s)
    _heartbeat.start()
    stream_writer.start(app.backend.client)
    # The backend's Redis client (one pool, as the heartbeat's): no client built at import time.
    _leases = LeaseKeeper(app.backend.client, settings.redis.lease_s)
    _leases.start()
    broker.on_malformed = DeadLetters(
        app.backend.client, lambda job_id, error: app.backend.mark_as_failure(job_id, error),
        worker=sender.hostname, max_entries=settings.worker.dead_letter_max, ttl_s=settings.redis.result_ttl_s,
    ).malformed


@signals.worker_shutdown.connect
def _stop_engine(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
    holder.stop()
    if not stream_writer.flush(STREAM_FLUSH_TIMEOUT_S):  # the last jobs' stream ends
        log.warning("stream entries still unwritten after %.0f s at shutdown; their readers end on the "
                    "jobs' results", STREAM_FLUSH_TIMEOUT_S)
    if _leases is not None:
        _leases.stop()  # last: a warm shutdown's jobs kept their leases until they finished
    if _reaper is not None:
        _reaper.terminate()


# Every delivery of a job passes these: Celery's own signals, so the task stays as it was
# (worker.metrics says how each final state reads as an outcome).
@signals.task_prerun.connect
def _job_started(sender: Any = None, task_id: str = "", **_: Any) -> None:
    if getattr(sender, "name", None) == keys.GENERATE_TASK:
        metrics.job_started(task_id)


@signals.task_postrun.connect
def _job_ended(sender: Any = None, task_id: str = "", state: str = "", retval: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) == keys.GENERATE_TASK:
        metrics.job_ended(task_id, state, retval)


@signals.task_revoked.connect
def _job_revoked(sender: Any = None, expired: bool = False, **_: Any) -> None:
    # Celery drops a queued message whose deadline passed before the task runs: no postrun.
    if expired and getattr(sender, "name", None) == keys.GENERATE_TASK:
        metrics.job_expired_unrun()
