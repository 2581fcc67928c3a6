"""vqueue's exceptions, split by what the caller should do.

* ``VQueueError``
    * ``JobError`` - about one job; carries ``job_id``
        * ``JobFailed`` - the job ended without a result. ``error_type`` says why, ``field``
          names the input at fault (when one is), ``retryable`` says whether submitting the
          same job again can help. The ``error_type`` values are the ``WireError`` classes below
          (``InvalidJob``, ``MalformedMessage``, ``EngineError``) or, for a message Celery
          itself refused before vqueue saw it, Celery's exception name (``NotRegistered``).
            * ``JobCancelled`` - cancelled (``Client.cancel``, ``vqueue queue purge``) before it
              finished; ``partial`` is what it produced until then (None if it never ran)
            * ``JobExpired`` - its deadline passed before it finished; ``partial`` as above
        * ``JobTimeout`` - no result within the timeout; the message says where the job is
        * ``JobNotFound`` - ``Client.job`` for an id Redis knows nothing about
    * ``QueueFull`` - ``submit`` to a model whose backlog is at ``queue.max_backlog``; nothing sent
    * ``ModelNotServed`` - ``submit(..., if_unserved="fail")`` for a model no live worker serves
    * ``BrokerUnavailable`` - Redis cannot be reached; names ``redis.url`` and how to start Redis
    * ``WireError`` - raised in the worker, stored by Celery, read back as ``JobFailed``:
        * ``InvalidJob`` - the job's input is wrong (also a ``ValueError``); fix it, submit again
        * ``MalformedMessage`` - the queue message itself could not be read (not vqueue's JSON
          envelope); the raw bytes are kept in the dead-letter list
        * ``EngineError`` - vLLM failed on this job for a reason other than its input; a retry may help
        * ``Quarantined`` - the engine died ``worker.max_engine_deaths`` times with the job in it;
          it is not delivered again (``vqueue dead`` lists it, ``vqueue dead retry`` resubmits it)
    * ``EngineDead`` - raised in the worker when its engine died or hung; the job is handed back
      to the queue, never failed for it

Jobs that fail validation at submit raise ``pydantic.ValidationError``, which names the field::

    try:
        result = client.result(job_id, timeout=60)
    except JobFailed as exc:
        print(exc.error_type, exc.field, exc.retryable, exc)
    except JobTimeout as exc:
        print("still waiting:", exc)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from producer.protocol import JobResult


class VQueueError(Exception):
    """Base of every vqueue error."""


class JobError(VQueueError):
    """Raised about one job; ``job_id`` names it."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobFailed(JobError):
    """A job ended without a result: refused by the worker or failed in the engine."""

    def __init__(self, job_id: str, error_type: str, message: str, field: str | None = None,
                 retryable: bool = False) -> None:
        where = f"{field}: " if field else ""
        super().__init__(job_id, f"job {job_id} failed: {error_type}: {where}{message}")
        self.error_type = error_type
        self.error = message
        self.field = field
        self.retryable = retryable


class JobCancelled(JobFailed):
    """A job was cancelled before it finished. ``partial`` is the ``JobResult`` it had produced
    by then (``outcome`` "cancelled", ``finish_reason`` "abort"), or None if it never ran."""

    def __init__(self, job_id: str, message: str, partial: JobResult | None = None) -> None:
        super().__init__(job_id, "Cancelled", message)
        self.partial = partial


class JobExpired(JobFailed):
    """A job's deadline passed: still queued, it never ran (``partial`` None); running, it was
    aborted and ``partial`` holds its output until then. Submitting it again may work."""

    def __init__(self, job_id: str, message: str, partial: JobResult | None = None) -> None:
        super().__init__(job_id, "Expired", message, retryable=True)
        self.partial = partial


class JobNotFound(JobError):
    """Raised by ``Client.job`` for an id Redis has no record, attempt or result of (never
    submitted, or older than ``redis.result_ttl_s``)."""


class QueueFull(VQueueError):
    """Raised by ``submit`` / ``submit_many`` when a model's backlog would pass
    ``queue.max_backlog``; nothing of the call was enqueued. Back off and submit again."""

    def __init__(self, model: str, depth: int, limit: int, adding: int) -> None:
        super().__init__(
            f"model {model!r} has {depth} jobs waiting and queue.max_backlog is {limit}: "
            f"{adding} more would pass it, so none was enqueued. Back off and submit again later, "
            f"or raise the limit (queue.max_backlog, or queue.models.{model!r}.max_backlog)"
        )
        self.model = model
        self.depth = depth
        self.limit = limit
        self.adding = adding


class JobTimeout(JobError):
    """Raised when a job has no result within the timeout; the job itself stays queued or running."""


class ModelNotServed(VQueueError):
    """Raised by ``submit(..., if_unserved="fail")`` when no live worker serves the job's model."""

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(
            f"no live worker serves model {model!r} (served now: {', '.join(served) or 'none'}); start a worker "
            f"with model.served_name={model!r}, or submit with if_unserved='wait' to queue the job for a later one"
        )
        self.model = model
        self.served = served


class BrokerUnavailable(VQueueError):
    """Redis, vqueue's broker and result store, cannot be reached."""

    def __init__(self, url: str, cause: BaseException) -> None:
        super().__init__(
            f"cannot reach Redis at redis.url={redact_url(url)} ({type(cause).__name__}: {cause}). "
            "Start it (`redis-server --appendonly yes`, or `docker compose up redis`), or point "
            "VQUEUE_REDIS__URL / settings.toml [redis] url at a running one (redis://:PASSWORD@HOST:6379/0)."
        )
        self.url = redact_url(url)


class RedisFull(VQueueError):
    """Redis refused to store jobs: it is at its ``maxmemory`` (with ``noeviction``, as vqueue
    asks, it refuses writes rather than dropping queued jobs). ``sent`` of the call's ``total``
    jobs were queued before it (the first ``sent``, in order: each pipeline of jobs is one
    MULTI/EXEC, all or none); the rest were not."""

    def __init__(self, sent: int, total: int, cause: BaseException) -> None:
        super().__init__(
            f"Redis is full (its maxmemory; {cause}): {sent} of this call's {total} jobs were queued before it, "
            f"the other {total - sent} were not. Raise Redis's maxmemory, lower redis.result_ttl_s (stored results "
            "take memory too), or set queue.max_backlog so that submit raises QueueFull before Redis fills; "
            "then submit the rest again."
        )
        self.sent = sent
        self.total = total


def redact_url(url: str) -> str:
    """``url`` with its password replaced, for messages and logs; each address of a
    ``sentinel://a;sentinel://b`` URL on its own."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


class WireError(VQueueError):
    """A job's failure as the worker stores it: Celery keeps ``type(exc).__name__`` and ``args``
    (JSON), and ``producer.outcomes`` turns them back into a ``JobFailed``."""

    retryable = False

    def __init__(self, field: str | None, message: str) -> None:
        # args are what Celery stores as "exc_message" (JSON): the field and the reason, apart.
        super().__init__(field, message)
        self.field = field
        self.reason = message

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason

    def __reduce__(self) -> tuple[type, tuple[str | None, str]]:
        # Celery checks that an exception survives pickling before storing it.
        return type(self), (self.field, self.reason)


class InvalidJob(WireError, ValueError):
    """The job will not run as given; the message names the field and the limit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)


class MalformedMessage(WireError):
    """The queue message could not be read as a vqueue job; it is kept in the dead-letter list."""


class EngineError(WireError):
    """vLLM failed on this job for a reason that is not its input; submitting it again may work."""

    retryable = True


class Quarantined(WireError):
    """The engine died ``worker.max_engine_deaths`` times with this job in it: it is not
    delivered again. The message gives the attempts and the last death's reason."""


#: Every ``WireError`` by the name Celery stores for it.
WIRE_ERRORS: dict[str, type[WireError]] = {c.__name__: c for c in (InvalidJob, MalformedMessage, EngineError,
                                                                   Quarantined)}


class EngineDead(VQueueError):
    """Raised in the worker when its vLLM engine died or stopped answering; in-flight jobs go
    back to the queue."""

    #: Whether the job was in the engine process when it died (its death counts against the
    #: job: ``worker.max_engine_deaths``), rather than on its way there.
    handed = False
