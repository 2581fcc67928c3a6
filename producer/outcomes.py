"""Celery's stored result meta, read back as a vqueue outcome: the one decoder.

The worker's Celery backend writes ``celery-task-meta-<job id>`` as JSON: ``{"status": ...,
"result": ...}`` where ``result`` is a ``JobResult`` on success and ``{"exc_type",
"exc_message", "exc_module"}`` on failure. Every reader (``Client.result``, ``as_completed``,
the CLI) goes through ``decode_meta``; a meta it cannot read becomes a ``JobFailed`` for that
job alone, never an exception that would stop the reader's other jobs.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from producer.errors import WIRE_ERRORS, JobFailed
from producer.protocol import JobResult

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
    return _failure(job_id, status, meta.get("result"))


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
