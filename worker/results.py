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
    TokenLogprob,
    TopLogprob,
    Usage,
)
from worker.sampling import top_logprobs


class JobStopped(Exception):
    """Raised by the engine process for a job stopped ("cancelled" / "expired") before it
    reached ``engine.generate``: there is no partial output. One stopped later is a
    ``JobResult`` whose ``outcome`` says so."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def first_token_at(output: Any) -> float | None:
    """Epoch seconds of the first output token, from the engine's own request stats."""
    stats = getattr(output, "metrics", None)
    arrival = getattr(stats, "arrival_time", None)
    latency = getattr(stats, "first_token_latency", None)
    if arrival and latency:
        return arrival + latency
    return None


def scheduled_at(output: Any) -> float | None:
    """Epoch seconds when vLLM's scheduler first ran the request.

    ``scheduled_ts`` is EngineCore's ``time.monotonic()``: CLOCK_MONOTONIC, the same clock in
    every process of the host, so this process's offset to the wall clock converts it.
    """
    ts = getattr(getattr(output, "metrics", None), "scheduled_ts", None)
    if not ts:
        return None
    return ts + (time.time() - time.monotonic())


def token_logprobs(completion: Any, top_k: int) -> list[TokenLogprob] | None:
    """Per generated token: its logprob and the ``top_k`` most likely alternatives (vLLM ranks)."""
    if completion.logprobs is None:
        return None
    out = []
    for token_id, step in zip(completion.token_ids, completion.logprobs, strict=False):
        chosen = step[token_id]
        top = sorted((e for e in step.items() if e[1].rank is not None and e[1].rank <= top_k),
                     key=lambda e: e[1].rank)[:top_k]  # fmt: skip
        alternatives = [TopLogprob(token=lp.decoded_token or "", token_id=tid, logprob=lp.logprob) for tid, lp in top]
        out.append(TokenLogprob(token=chosen.decoded_token or "", token_id=token_id, logprob=chosen.logprob,
                                top_logprobs=alternatives))
    return out


def build_result(
    job: CompletionJob | ChatJob, output: Any, *, started_at: float, worker: str, attempt: int,
    enqueued_at: float | None = None, handed_at: float | None = None, outcome: str = "succeeded",
) -> JobResult:
    choices = []
    top_k = top_logprobs(job.sampling) or 0
    for completion in sorted(output.outputs, key=lambda c: c.index):
        common = {
            "index": completion.index,
            "finish_reason": FinishReason(completion.finish_reason or "abort"),
            "stop_reason": completion.stop_reason,
            "logprobs": token_logprobs(completion, top_k),
        }
        if isinstance(job, ChatJob):
            choices.append(Choice(message=AssistantMessage(content=completion.text), **common))
        else:
            choices.append(Choice(text=completion.text, **common))
    prompt_tokens = len(output.prompt_token_ids or [])
    completion_tokens = sum(len(c.token_ids) for c in output.outputs)
    return JobResult(
        id=job.id,
        model=job.model,
        kind=job.kind,
        choices=choices,
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
        timings=Timings(enqueued_at=enqueued_at or job.created_at, started_at=started_at, handed_at=handed_at,
                        scheduled_at=scheduled_at(output), first_token_at=first_token_at(output),
                        finished_at=time.time()),
        worker=worker,
        attempt=attempt,
        outcome=outcome,
    )
