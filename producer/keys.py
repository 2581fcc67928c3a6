"""Every name vqueue uses in Redis and Celery, in one place.

Redis keys (db of ``redis.url``):

=================================  =======  ==============================================
key                                type     holds
=================================  =======  ==============================================
``vqueue.<served_name>``           list     the model's queue: Celery messages (JSON), the
                                            broker's; one queue per served model name
``celery-task-meta-<job id>``      string   Celery's result backend: JSON ``{"status",
                                            "result", ...}``; ``result`` is a ``JobResult``
                                            or an error; TTL ``redis.result_ttl_s``.
                                            Celery builds this key (``task_keyprefix``);
                                            ``result_key`` mirrors it for polling
``unacked`` / ``unacked_index``    hash /   Celery's late-ack bookkeeping (kombu): jobs
                                   zset     reserved by a worker, delivered again after
                                            ``redis.visibility_timeout_s``
``_kombu.binding.*``               set      kombu's queue bindings
``vqueue:attempt:<job id>``        string   how many times a worker started the job (INCR);
                                            its presence means "started"; TTL
                                            ``redis.result_ttl_s``
``vqueue:blob:<job id>:<n>``       string   the raw bytes of the job's n-th data: URI image,
                                            written before the job is queued; the job
                                            carries ``vqueue-blob:<that key>`` instead
                                            (keeps megabytes out of Celery messages, Flower
                                            and the worker's consumer thread); TTL
                                            ``redis.result_ttl_s``, deleted when the job ends
``vqueue:worker:<hostname>``       string   a live worker's announcement (JSON ``WorkerInfo``:
                                            served model, source, max_model_len, modalities,
                                            started time); TTL 3 x ``worker.heartbeat_s``,
                                            refreshed every ``worker.heartbeat_s``
=================================  =======  ==============================================
"""

from __future__ import annotations

#: The one Celery task that runs a job (completion or chat).
GENERATE_TASK = "vqueue.generate"

QUEUE_PREFIX = "vqueue."
RESULT_KEY_PREFIX = "celery-task-meta-"  # Celery's BaseKeyValueStoreBackend.task_keyprefix
ATTEMPT_KEY_PREFIX = "vqueue:attempt:"
WORKER_KEY_PREFIX = "vqueue:worker:"
BLOB_KEY_PREFIX = "vqueue:blob:"
#: The URL scheme of an image the producer moved to a blob key.
BLOB_SCHEME = "vqueue-blob:"
#: A worker's announcement outlives this many missed heartbeats, then expires.
HEARTBEAT_TTL_BEATS = 3


def queue_for(served_name: str) -> str:
    """The Redis list (Celery queue) that workers serving ``served_name`` consume."""
    return f"{QUEUE_PREFIX}{served_name}"


def result_key(job_id: str) -> str:
    return f"{RESULT_KEY_PREFIX}{job_id}"


def attempt_key(job_id: str) -> str:
    return f"{ATTEMPT_KEY_PREFIX}{job_id}"


def worker_key(hostname: str) -> str:
    return f"{WORKER_KEY_PREFIX}{hostname}"


def blob_key(job_id: str, index: int) -> str:
    return f"{BLOB_KEY_PREFIX}{job_id}:{index}"


def blob_url(key: str) -> str:
    """What a job carries in place of an image moved to ``key``."""
    return f"{BLOB_SCHEME}{key}"


def blob_key_of(url: str) -> str | None:
    """The Redis key a ``vqueue-blob:`` URL names; None for any other URL."""
    return url[len(BLOB_SCHEME) :] if url.startswith(BLOB_SCHEME) else None
