"""Celery's stored result meta, read back as a vqueue outcome: the one decoder.

The worker's Celery backend writes ``celery-task-meta-<job id>`` as JSON: ``{"status": ...,
"result": ...}`` where ``result`` is a ``JobResult`` on success and ``{"exc_type",
"exc_message", "exc_module"}`` on failure. A job stopped early is stored in Celery's REVOKED
state (Flower shows it revoked) as Celery's own ``TaskRevokedError(reason[, partial])``:
``reason`` "expired" (Celery's own expiry of a queued job, or a deadline reached while
running) reads back as ``JobExpired``, any other ("cancelled", "purged", Celery's "revoked")
as ``JobCancelled``; ``partial`` is the ``JobResult`` produced until then. Every reader
(``Client.result``, ``as_completed``, the CLI) goes through ``decode_meta``; a meta it cannot
read becomes a ``JobFailed`` for that job alone, never an exception that would stop the reader's other jobs.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from producer.errors import WIRE_ERRORS, JobCancelled, JobExpired, JobFailed
from producer.protocol import JobResult, JobState

#: Celery states after which nothing more happens to a job.
TERMINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


def decode_meta(job_id: str, raw: bytes | str | None) -> JobResult | JobFailed | None:
    """The job's terminal outcome from its stored meta; None while it is unfinished."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
        status = meta.get("status")
    except (ValueError, AttributeError) as exc:
        return JobFailed(job_id, "UnreadableResult", f"the stored result is not Celery's JSON meta ({exc})")
    if status not in TERMINAL_STATES:
        return None
    if status == "SUCCESS":
        try:
            return JobResult.model_validate(meta.get("result"))
        except ValidationError as exc:
            return JobFailed(job_id, "UnreadableResult", f"the stored result is not a JobResult ({exc})")
    if status == "REVOKED":
        return _revoked(job_id, meta.get("result"))
    return _failure(job_id, status, meta.get("result"))


#: What ``TaskRevokedError``'s reason says about how the job stopped.
STOP_MESSAGES = {
    "cancelled": "cancelled (Client.cancel / vqueue cancel)",
    "purged": "cancelled: purged from its queue (vqueue queue purge)",
    "revoked": "cancelled: revoked through Celery",
    "expired": "its deadline passed",
}


def revoked_error(reason: str, partial: dict | None = None) -> dict[str, Any]:
    """The stored form of a stopped job (Celery's for ``TaskRevokedError(reason[, partial])``)."""
    args: list[Any] = [reason] if partial is None else [reason, partial]
    return {"exc_type": "TaskRevokedError", "exc_message": args, "exc_module": "celery.exceptions"}


def revoked_meta(job_id: str, reason: str, at: float) -> str:
    """Celery's stored meta (JSON) of a job stopped for ``reason`` at epoch ``at``, without output."""
    return json.dumps({"status": "REVOKED", "result": revoked_error(reason), "traceback": None, "children": [],
                       "date_done": datetime.fromtimestamp(at, UTC).isoformat(), "task_id": job_id})


def _revoked(job_id: str, error: Any) -> JobFailed:
    args = error.get("exc_message") if isinstance(error, dict) else None
    args = args if isinstance(args, list) and args else [str(error)]
    reason = str(args[0])
    partial = None
    if len(args) > 1 and isinstance(args[1], dict):
        try:
            partial = JobResult.model_validate(args[1])
        except ValidationError as exc:
            return JobFailed(job_id, "UnreadableResult", f"the stored partial result is not a JobResult ({exc})")
    got = f"; {partial.usage.completion_tokens} tokens produced until then" if partial else ""
    message = STOP_MESSAGES.get(reason, f"revoked ({reason})") + got
    if reason == "expired":
        return JobExpired(job_id, message + ("" if partial else " while it was queued: it never ran"), partial)
    return JobCancelled(job_id, message, partial)


def state_of(outcome: JobResult | JobFailed) -> JobState:
    """The job's final state in ``JobRecord`` terms."""
    if isinstance(outcome, JobResult):
        return "succeeded"
    if isinstance(outcome, JobExpired):
        return "expired"
    if isinstance(outcome, JobCancelled):
        return "cancelled"
    return "quarantined" if outcome.error_type == "Quarantined" else "failed"


def _failure(job_id: str, status: str, error: Any) -> JobFailed:
    if not isinstance(error, dict):
        return JobFailed(job_id, status, str(error))
    error_type = str(error.get("exc_type") or status)
    args = error.get("exc_message")
    wire = WIRE_ERRORS.get(error_type)
    if wire is not None and isinstance(args, list) and len(args) == 2:
        field, message = args
        return JobFailed(job_id, error_type, str(message), field=field, retryable=wire.retryable)
    if isinstance(args, list | tuple):
        args = " ".join(str(a) for a in args)
    return JobFailed(job_id, error_type, str(args))
