"""Unreadable messages set aside: a dead-letter entry, a typed failure for the job, a count, a log line."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable

import redis

from producer import keys
from producer.errors import WireError
from producer.protocol import DEAD_LETTER_RAW_BYTES, DeadLetter

log = logging.getLogger(__name__)


class DeadLetters:
    """Writes ``vqueue:dead-letters``; ``fail_job(job_id, error)`` stores the job's failed result."""

    def __init__(self, client: redis.Redis, fail_job: Callable[[str, WireError], None], *, worker: str,
                 max_entries: int, ttl_s: int) -> None:
        self._client = client
        self._fail_job = fail_job
        self.worker = worker
        self._max = max_entries
        self._ttl_s = ttl_s

    def malformed(self, raw: bytes | str, queue: str, job_id: str | None, error: WireError) -> None:
        data = raw.encode(errors="surrogateescape") if isinstance(raw, str) else raw
        entry = DeadLetter(queue=queue, job_id=job_id, error_type=type(error).__name__, field=error.field,
                           reason=error.reason, raw_b64=base64.b64encode(data[:DEAD_LETTER_RAW_BYTES]).decode(),
                           raw_size=len(data), at=time.time(), worker=self.worker)
        self.add(entry)
        log.error("dead-lettered an unreadable message on %s (job %s, %d bytes): %s: %s", queue, job_id or "unknown",
                  len(data), type(error).__name__, error)
        if job_id is not None:
            self._fail_job(job_id, error)

    def add(self, entry: DeadLetter) -> None:
        """Keep ``entry`` at the head of the list (at most ``max_entries``), count it, renew the TTLs."""
        with self._client.pipeline(transaction=False) as pipe:
            pipe.lpush(keys.DEAD_LETTERS_KEY, entry.model_dump_json())
            pipe.ltrim(keys.DEAD_LETTERS_KEY, 0, self._max - 1)
            pipe.expire(keys.DEAD_LETTERS_KEY, self._ttl_s)
            pipe.incr(keys.DEAD_LETTERS_TOTAL_KEY)
            pipe.expire(keys.DEAD_LETTERS_TOTAL_KEY, self._ttl_s)
            pipe.execute()
