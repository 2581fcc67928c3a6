"""Turning the engine's final ``RequestOutput`` into the protocol's ``JobResult``, and a
streamed job's per-step outputs into its stream chunks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from producer.protocol import (
    AssistantMessage,
    ChatJob,
    Choice,
    CompletionJob,
    FinishReason,
    JobResult,
    StreamChoice,
    StreamChunk,
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


@dataclass
class Completion:
    """One choice's output, as vLLM's ``CompletionOutput`` but with its logprobs in protocol form."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: str | int | None


def completions_of(output: Any, top_k: int) -> list[Completion]:
    """Each choice in ``output`` (vLLM's ``RequestOutput``), in index order."""
    return [Completion(c.index, c.text, c.token_ids, token_logprobs(c, top_k), c.finish_reason, c.stop_reason)
            for c in sorted(output.outputs, key=lambda c: c.index)]  # fmt: skip


class DeltaJoiner:
    """A streamed job's outputs (vLLM's ``RequestOutputKind.DELTA``: each holds only what the
    step produced) turned into stream chunks, and joined again into whole choices for the
    result, which must be the same as without streaming."""

    def __init__(self, top_k: int, attempt: int) -> None:
        self.top_k = top_k
        self.attempt = attempt
        #: Per choice index: its text pieces (joined once, at the end) and its whole so far.
        self._texts: dict[int, list[str]] = {}
        self._joined: dict[int, Completion] = {}

    def add(self, output: Any) -> StreamChunk | None:
        """The chunk for one delta output (None if it holds nothing new), joined into the whole."""
        choices = []
        for delta in completions_of(output, self.top_k):
            if not delta.token_ids and not delta.text and delta.finish_reason is None:
                continue
            choices.append(StreamChoice(index=delta.index, text=delta.text, token_ids=delta.token_ids,
                                        logprobs=delta.logprobs, finish_reason=delta.finish_reason,
                                        stop_reason=delta.stop_reason))  # fmt: skip
            whole = self._joined.get(delta.index)
            if whole is None:
                whole = self._joined[delta.index] = Completion(delta.index, "", [], None, None, None)
                self._texts[delta.index] = []
            self._texts[delta.index].append(delta.text)
            whole.token_ids.extend(delta.token_ids)
            if delta.logprobs is not None:
                whole.logprobs = whole.logprobs or []
                whole.logprobs.extend(delta.logprobs)
            whole.finish_reason, whole.stop_reason = delta.finish_reason, delta.stop_reason
        return StreamChunk(attempt=self.attempt, choices=choices) if choices else None

    def completions(self) -> list[Completion]:
        """Every choice joined whole, in index order."""
        for index, whole in self._joined.items():
            whole.text = "".join(self._texts[index])
        return [self._joined[i] for i in sorted(self._joined)]


def build_result(
    job: CompletionJob | ChatJob, output: Any, *, started_at: float, worker: str, attempt: int,
    enqueued_at: float | None = None, handed_at: float | None = None, outcome: str = "succeeded",
    completions: list[Completion] | None = None,
) -> JobResult:
    """The job's result from the engine's final ``output`` (prompt, timings); its choices from
    ``output`` too, or from ``completions`` where they were joined from deltas (streamed jobs)."""
    if completions is None:
        completions = completions_of(output, top_logprobs(job.sampling) or 0)
    choices = []
    for completion in completions:
        common = {
            "index": completion.index,
            "finish_reason": FinishReason(completion.finish_reason or "abort"),
            "stop_reason": completion.stop_reason,
            "logprobs": completion.logprobs,
        }
        if isinstance(job, ChatJob):
            choices.append(Choice(message=AssistantMessage(content=completion.text), **common))
        else:
            choices.append(Choice(text=completion.text, **common))
    prompt_tokens = len(output.prompt_token_ids or [])
    completion_tokens = sum(len(c.token_ids) for c in completions)
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
