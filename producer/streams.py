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

from producer.protocol import StreamChunk, StreamEnd, StreamOutcome

#: The one field of every entry.
FIELD = "data"


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
