"""Turning the engine's final ``RequestOutput`` into the protocol's ``JobResult``."""

from __future__ import annotations

import time
from typing import Any

from producer.protocol import (
    AssistantMessage,
    ChatJob,
    Choice,
    CompletionJob,
    FinishReason,
    JobResult,
    Timings,
    Usage,
)


def first_token_at(output: Any) -> float | None:
    """Epoch seconds of the first output token, from the engine's own request stats."""
    stats = getattr(output, "metrics", None)
    arrival = getattr(stats, "arrival_time", None)
    latency = getattr(stats, "first_token_latency", None)
    if arrival and latency:
        return arrival + latency
    return None


def build_result(
    job: CompletionJob | ChatJob, output: Any, *, started_at: float, worker: str, attempt: int
) -> JobResult:
    choices = []
    for completion in output.outputs:
        reason = FinishReason(completion.finish_reason or "abort")
        if isinstance(job, ChatJob):
            choices.append(Choice(index=completion.index, message=AssistantMessage(content=completion.text),
                                  finish_reason=reason))
        else:
            choices.append(Choice(index=completion.index, text=completion.text, finish_reason=reason))
    prompt_tokens = len(output.prompt_token_ids or [])
    completion_tokens = sum(len(c.token_ids) for c in output.outputs)
    return JobResult(
        id=job.id,
        model=job.model,
        kind=job.kind,
        choices=choices,
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
        timings=Timings(enqueued_at=job.created_at, started_at=started_at,
                        first_token_at=first_token_at(output), finished_at=time.time()),
        worker=worker,
        attempt=attempt,
    )
