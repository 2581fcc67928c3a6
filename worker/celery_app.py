"""The worker's Celery app: ``celery -A worker worker`` finds it as ``worker.app``.

Importing this is cheap (Flower and ``celery inspect`` import it too): the engine is built
on ``worker_init``, before the worker takes any job, and shut down on ``worker_shutdown``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from kombu import Queue

from producer import keys
from producer.settings import get_settings
from producer.transport import make_celery
from worker.engine import EngineHolder

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
    worker_send_task_events=True,
    task_track_started=True,
    worker_hijack_root_logger=True,
)

holder = EngineHolder(settings)


@signals.worker_init.connect
def _start_engine(**_: Any) -> None:
    log.info("vqueue worker: model %r from %s, queue %s, %d jobs in flight at most",
             settings.model.served_name, settings.model.source, keys.queue_for(settings.model.served_name),
             settings.worker.max_in_flight)
    holder.start()


@signals.worker_shutdown.connect
def _stop_engine(**_: Any) -> None:
    holder.stop()
