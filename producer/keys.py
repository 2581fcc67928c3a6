"""Every name vqueue uses in Redis and Celery, in one place.

Redis keys (db of ``redis.url``):

=================================  =======  ==============================================
key                                type     holds
=================================  =======  ==============================================
``vqueue.<served_name>``           list     the model's queue: Celery messages (JSON), the
                                            broker's; one queue per served model name, one
                                            list per kombu priority step k (1-9: the name
                                            + ``\\x06\\x16<k>``; step 0 is the bare name).
                                            vqueue priority p (0-9, higher first) is kombu
                                            step 9 - p; workers take the lists in step
                                            order (``queue_lists``)
``celery-task-meta-<job id>``      string   Celery's result backend: JSON ``{"status",
                                            "result", ...}``; ``result`` is a ``JobResult``
                                            or an error; TTL ``redis.result_ttl_s``.
                                            Celery builds this key (``task_keyprefix``);
                                            ``result_key`` mirrors it for polling
``unacked`` / ``unacked_index``    hash /   kombu's late-ack bookkeeping: each message a
                                   zset     worker holds, scored by its lease's start; the
                                            holder renews its leases every
                                            ``redis.lease_s / 6``; a lease older than
                                            ``redis.lease_s`` (its worker died) is put
                                            back on the queue by any live worker. No TTL:
                                            an entry lives exactly as long as its message
                                            is held (acked or restored: removed)
``unacked_mutex``                  string   kombu's lock for that restore sweep; TTL
                                            ``redis.lease_s``
``_kombu.binding.*``               set      kombu's queue bindings
``vqueue:attempt:<job id>``        string   how many times a worker started the job (INCR);
                                            its presence means "started"; TTL
                                            ``redis.result_ttl_s``
``vqueue:job:<job id>``            hash     the job's record: model, kind, priority,
                                            deadline and ``enqueued_at`` (written with the
                                            message, in its pipeline), then ``state``,
                                            ``worker``, ``picked_up_at``, ``attempts`` and
                                            ``attempt:<n>`` ("<worker> <epoch s>") at each
                                            pickup, ``engine_deaths`` / ``last_death``;
                                            the end of the job is read from its result.
                                            TTL ``redis.result_ttl_s``
``vqueue:cancel:<job id>``         string   the job was cancelled ("cancelled" / "purged"):
                                            a worker that picks it up skips it, whenever
                                            that is; TTL ``redis.result_ttl_s``
``vqueue:cancel``                  channel  pub/sub, not a key: a cancelled job's id, heard
                                            by every worker (one subscription each); the
                                            one running it aborts it in its engine
``vqueue:blob:<job id>:<n>``       string   the raw bytes of the job's n-th data: URI image,
                                            written before the job is queued; the job
                                            carries ``vqueue-blob:<that key>`` instead
                                            (keeps megabytes out of Celery messages, Flower
                                            and the worker's consumer thread); TTL
                                            ``redis.result_ttl_s``, deleted when the job ends
``vqueue:stream:<job id>``         stream   a streaming job's (``stream=True``) new output
                                            as it is produced: one entry per engine step,
                                            field ``data`` = JSON ``StreamChunk`` (attempt;
                                            choices: index, text delta, token_ids,
                                            logprobs, finish_reason, stop_reason), then one
                                            ``StreamEnd`` (``{"end": true, "outcome"}``)
                                            once the outcome is stored
                                            (``producer.streams``); TTL
                                            ``redis.result_ttl_s``, set with the first
                                            entries and renewed with each write
``vqueue:dead-letters``            list     messages no worker could read, and quarantined
                                            jobs (JSON ``DeadLetter``: kind, reason, queue,
                                            job id, the first raw bytes in base64),
                                            newest first, at most
                                            ``worker.dead_letter_max``; TTL
                                            ``redis.result_ttl_s``, renewed on each write
``vqueue:dead-letters:total``      string   how many were ever dead-lettered (INCR); TTL
                                            ``redis.result_ttl_s``, renewed on each write
``vqueue:models``                  set      every served model name that has had a queue:
                                            added when a producer first declares a queue
                                            and when a worker starts serving it; what the
                                            backlog metrics read (``producer.backlog``)
                                            instead of scanning keys. No TTL: a model left
                                            unused stays, at 0 waiting
``vqueue:worker:<hostname>``       string   a live worker's announcement (JSON ``WorkerInfo``:
                                            served model, source, max_model_len, modalities,
                                            started time); TTL 3 x ``worker.heartbeat_s``,
                                            refreshed every ``worker.heartbeat_s``
``vqueue:batch:<batch id>``        hash     a batch file's state (``producer.batch``):
                                            lines, created_at, deadline, status, counts,
                                            files; its jobs are ``<batch id>-<line>``
                                            (``batch_job_id``); TTL ``redis.result_ttl_s``
                                            after it ends (none while it runs)
``vqueue:batch:<batch id>:owner``  string   who is running the batch now (a lease: one
                                            runner at a time, renewed while it runs); TTL
                                            ``batch.lease_s``
``vqueue:batches``                 zset     batch ids the gateway accepted, by creation time
``vqueue:file:<file id>``          hash     a file of ``/v1/files`` (``gateway.files``): id,
                                            filename, purpose, bytes, created_at, and
                                            ``batch`` for a batch's output / error file;
                                            its bytes are ``<files.dir>/<file id>``. No
                                            TTL: it lives until ``DELETE /v1/files/<id>``
``vqueue:files``                   zset     every file id of ``/v1/files``, by creation time
=================================  =======  ==============================================
"""

from __future__ import annotations

#: The one Celery task that runs a job (completion or chat).
GENERATE_TASK = "vqueue.generate"

QUEUE_PREFIX = "vqueue."
RESULT_KEY_PREFIX = "celery-task-meta-"  # Celery's BaseKeyValueStoreBackend.task_keyprefix
ATTEMPT_KEY_PREFIX = "vqueue:attempt:"
WORKER_KEY_PREFIX = "vqueue:worker:"
MODELS_KEY = "vqueue:models"
DEAD_LETTERS_KEY = "vqueue:dead-letters"
DEAD_LETTERS_TOTAL_KEY = "vqueue:dead-letters:total"
#: kombu's Redis transport keys (set explicitly in ``transport.make_celery`` so they live here).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
UNACKED_MUTEX_KEY = "unacked_mutex"
BLOB_KEY_PREFIX = "vqueue:blob:"
JOB_KEY_PREFIX = "vqueue:job:"
STREAM_KEY_PREFIX = "vqueue:stream:"
CANCEL_KEY_PREFIX = "vqueue:cancel:"
#: The pub/sub channel cancelled job ids are published on (see ``worker.job_control``).
CANCEL_CHANNEL = "vqueue:cancel"
BATCH_KEY_PREFIX = "vqueue:batch:"
#: Every batch the gateway accepted (``/v1/batches``), newest first by creation time.
BATCHES_KEY = "vqueue:batches"
FILE_KEY_PREFIX = "vqueue:file:"
#: Every file ``/v1/files`` holds (uploads and batch outputs), by creation time.
FILES_KEY = "vqueue:files"
#: kombu's Redis transport names priority step k of queue q ``q + "\x06\x16" + str(k)`` (k > 0).
KOMBU_PRIORITY_SEP = "\x06\x16"
#: vqueue priorities: 0-9, a higher number runs first.
PRIORITIES = range(10)
#: The URL scheme of an image the producer moved to a blob key.
BLOB_SCHEME = "vqueue-blob:"
#: A worker's announcement outlives this many missed heartbeats, then expires.
HEARTBEAT_TTL_BEATS = 3


def queue_for(served_name: str) -> str:
    """The Redis list (Celery queue) that workers serving ``served_name`` consume."""
    return f"{QUEUE_PREFIX}{served_name}"


def kombu_priority(priority: int) -> int:
    """kombu's priority step for a vqueue priority: kombu takes step 0 first, vqueue runs 9 first."""
    return 9 - priority


def priority_list(queue: str, priority: int) -> str:
    """The Redis list kombu's Redis transport pushes a message of vqueue ``priority`` to."""
    step = kombu_priority(priority)
    return f"{queue}{KOMBU_PRIORITY_SEP}{step}" if step else queue


def queue_lists(served_name: str) -> dict[int, str]:
    """Every list of ``served_name``'s queue by vqueue priority, highest (taken first) first."""
    return {p: priority_list(queue_for(served_name), p) for p in sorted(PRIORITIES, reverse=True)}


def queue_of_list(name: str) -> str:
    """The queue a priority list belongs to (``vqueue.m`` + ``KOMBU_PRIORITY_SEP`` + ``3`` -> ``vqueue.m``)."""
    return name.split(KOMBU_PRIORITY_SEP, 1)[0]


def job_key(job_id: str) -> str:
    return f"{JOB_KEY_PREFIX}{job_id}"


def batch_key(batch_id: str) -> str:
    return f"{BATCH_KEY_PREFIX}{batch_id}"


def file_key(file_id: str) -> str:
    return f"{FILE_KEY_PREFIX}{file_id}"


def batch_owner_key(batch_id: str) -> str:
    return f"{BATCH_KEY_PREFIX}{batch_id}:owner"


def batch_job_id(batch_id: str, line: int) -> str:
    """The job of line ``line`` (0-based) of batch ``batch_id``: the same every time the batch
    is run, so a batch run again after a crash submits nothing twice."""
    return f"{batch_id}-{line}"


def batch_line_of(job_id: str) -> int | None:
    """The line ``batch_job_id`` made ``job_id`` from (None: not a batch job id)."""
    _, sep, line = job_id.rpartition("-")
    return int(line) if sep and line.isdigit() else None


def stream_key(job_id: str) -> str:
    """The Redis stream a streaming job's output is written to as it is produced."""
    return f"{STREAM_KEY_PREFIX}{job_id}"


def cancel_key(job_id: str) -> str:
    return f"{CANCEL_KEY_PREFIX}{job_id}"


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
