"""vqueue's exceptions, split by what the caller should do.

* ``VQueueError``
    * ``JobError`` - about one job; carries ``job_id``
        * ``JobFailed`` - the job ended without a result; ``error_type`` says why:
          ``InvalidJob`` (fix the input and submit again) or an engine error (retry)
        * ``JobTimeout`` - no result within the timeout; the message says where the job is
    * ``ModelNotServed`` - ``submit(..., if_unserved="fail")`` for a model no live worker serves
    * ``InvalidJob`` - raised in the worker for a job it refuses (also a ``ValueError``);
      reaches the producer as ``JobFailed(error_type="InvalidJob")``
    * ``EngineDead`` - raised in the worker when its engine died; the job is handed back
      to the queue, never failed for it

Jobs that fail validation at submit raise ``pydantic.ValidationError``, which names the field::

    try:
        result = client.result(job_id, timeout=60)
    except JobFailed as exc:
        print(exc.error_type, exc)
    except JobTimeout as exc:
        print("still waiting:", exc)
"""

from __future__ import annotations


class VQueueError(Exception):
    """Base of every vqueue error."""


class JobError(VQueueError):
    """Raised about one job; ``job_id`` names it."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobFailed(JobError):
    """Raised when a job ended without a result: refused by the worker or failed in the engine."""

    def __init__(self, job_id: str, error_type: str, message: str) -> None:
        super().__init__(job_id, f"job {job_id} failed: {error_type}: {message}")
        self.error_type = error_type
        self.error = message


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


class InvalidJob(VQueueError, ValueError):
    """Raised in the worker for a job it will not run; the message names the field and the limit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Celery checks that an exception survives pickling before storing it.
        return type(self), (self.field, self.reason)


class EngineDead(VQueueError):
    """Raised in the worker when its vLLM engine died; in-flight jobs go back to the queue."""
