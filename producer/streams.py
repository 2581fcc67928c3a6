"""A streaming job's Redis stream (``vqueue:stream:<job id>``), encoded and decoded once.

The worker writes, the readers (``Client.stream``, the HTTP gateway) read; both go through
this module. Each entry has one field, ``data``, holding JSON:

* a ``StreamChunk``, one per engine step that produced output for the job::

    {"attempt": 1, "choices": [{"index": 0, "text": " the new text", "token_ids": [279, 501],
                                "logprobs": null, "finish_reason": null, "stop_reason": null}]}

* then, once the job's outcome is stored (its result, or its error), one ``StreamEnd``::

    {"end": true, "outcome": "succeeded"}      # or "failed", "cancelled", "expired"

Read from ``0-0``, a stream gives a reader that attaches late everything from the start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import ValidationError

from producer.errors import JobFailed
from producer.protocol import JobResult, StreamChunk, StreamEnd, StreamOutcome

#: The one field of every entry.
FIELD = "data"
#: How long a reader waits for the end entry of a job whose outcome is stored already.
STREAM_END_GRACE_S = 5.0


def encode_chunk(chunk: StreamChunk) -> dict[str, str]:
    """The fields of the XADD that writes ``chunk``."""
    return {FIELD: chunk.model_dump_json()}


def encode_end(outcome: StreamOutcome) -> dict[str, str]:
    """The fields of the XADD that closes a job's stream."""
    return {FIELD: StreamEnd(outcome=outcome).model_dump_json()}


def decode_entry(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> StreamChunk | StreamEnd:
    """One entry's fields (as redis-py returns them) as a ``StreamChunk`` or a ``StreamEnd``;
    ``ValueError`` names what is wrong with an entry no vqueue worker wrote."""
    raw = fields.get(FIELD.encode(), fields.get(FIELD))  # type: ignore[call-overload]  # bytes or str keys
    if raw is None:
        raise ValueError(f"stream entry has no {FIELD!r} field (fields: {sorted(map(str, fields))}): "
                         "not written by a vqueue worker")
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and data.get("end") is True:
            return StreamEnd.model_validate(data)
        return StreamChunk.model_validate(data)
    except (ValueError, ValidationError) as exc:
        raise ValueError(f"stream entry is neither a StreamChunk nor a StreamEnd ({exc}): {raw[:200]!r}") from None


def after_quiet(job_id: str, outcome: JobResult | JobFailed | None, streamed: bool, ended_at: float | None,
                now: float) -> tuple[bool, float | None]:
    """A reader's step when its stream has been quiet for a poll interval; ``outcome`` is the
    job's stored one (None while it runs). Returns (done, when the reader first saw the job
    ended); raises the job's error, after what it streamed.

    A job cancelled or expired while queued never streams, and a worker that lost Redis drops
    entries (its end among them): so once the outcome is stored, the end gets
    ``STREAM_END_GRACE_S`` to arrive, then the stored outcome decides.
    """
    if outcome is None:
        return False, ended_at
    if isinstance(outcome, JobFailed) and not streamed:
        raise outcome  # it ended before it streamed anything (cancelled while queued, say)
    ended_at = ended_at or now
    if now - ended_at < STREAM_END_GRACE_S:
        return False, ended_at
    if isinstance(outcome, JobFailed):
        raise outcome
    if not streamed:
        # Not the job's failure (its result is whole): the stream it was asked for is missing.
        raise JobFailed(job_id, "NotStreamed", f"job {job_id} succeeded but wrote no stream entries: it was not "
                        "submitted with stream=True (set it on the job), or its worker could not reach Redis. "
                        "Its result has the whole output.")
    return True, ended_at  # its end was lost; every chunk that could be written was
