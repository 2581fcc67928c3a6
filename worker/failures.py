"""The one failure path: any exception raised while running a job becomes a typed outcome.

* ``EngineDead`` (vLLM's ``EngineDeadError``, the engine process gone or hung): not the job's
  fault; the task hands the job back to the queue and the worker exits 70.
* ``InvalidJob``: the job's input (vLLM's validation errors, named by their parameter).
* ``EngineError``: anything else vLLM or vqueue raised for this job (``retryable``).

The result is what Celery stores and ``producer.outcomes`` reads back as ``JobFailed``.
"""

from __future__ import annotations

import logging
from functools import cache

from producer.errors import EngineDead, EngineError, InvalidJob, WireError

log = logging.getLogger(__name__)


@cache
def _vllm_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(engine dead, bad input) exception classes of the installed vLLM; empty without vLLM."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:
        return (), (ValueError,)
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # older vLLM: its validation errors are ValueErrors
        return (EngineDeadError,), (ValueError,)
    return (EngineDeadError,), (VLLMValidationError, ValueError)


def job_field(parameter: str | None, default: str) -> str:
    """The job's field for a vLLM parameter name (vLLM says ``input_tokens`` for the prompt)."""
    from producer.protocol import Sampling

    if parameter in Sampling.model_fields:
        return f"sampling.{parameter}"
    return default


def classify(exc: BaseException, field: str = "job") -> WireError | EngineDead:
    """``exc`` as vqueue's typed error; ``field`` is the job field a bad-input error is about."""
    if isinstance(exc, WireError | EngineDead):
        return exc  # before vLLM's classes: the Celery worker's process never imports vLLM for these
    dead, invalid = _vllm_errors()
    if isinstance(exc, dead):
        return EngineDead(f"vLLM engine died: {exc}")
    if isinstance(exc, invalid):
        parameter = getattr(exc, "parameter", None)
        message = str(exc)
        if parameter == "input_tokens":  # vLLM's renderer: the prompt alone overflows the context
            message += " The context is the workers' engine.max_model_len: shorten the prompt."
        return InvalidJob(job_field(parameter, field), message)
    log.warning("job failed in the engine", exc_info=exc)
    return EngineError(None, f"{type(exc).__name__}: {exc}")
