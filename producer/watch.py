"""Waiting for the outcomes of a changing set of jobs (``Client.as_completed``, batch files).

Celery's Redis backend publishes each result on a channel named after its key as it stores
it: a subscriber hears it at once. Results stored before the subscription (or while the
connection was down) are found by an MGET sweep, at the start and every ``poll_interval_s``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import redis

from producer import keys
from producer.errors import JobFailed
from producer.outcomes import decode_meta
from producer.protocol import JobResult

#: Keys one MGET or SUBSCRIBE names at most.
CHUNK = 1000

Outcome = JobResult | JobFailed


class OutcomeWatcher:
    """Outcomes of the jobs ``add``-ed, each once, as they are stored.

    Not thread-safe (one pub/sub connection). A Redis error out of ``wait`` leaves the watcher
    usable: the next ``wait`` subscribes again and sweeps first, so nothing stored meanwhile
    is missed.
    """

    def __init__(self, client: redis.Redis, poll_interval_s: float) -> None:
        self._redis = client
        self._poll_s = poll_interval_s
        self._pending: dict[str, None] = {}
        self._pubsub: redis.client.PubSub | None = None
        self._next_sweep = 0.0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_ids(self) -> list[str]:
        return list(self._pending)

    def add(self, job_ids: Iterable[str]) -> None:
        new = [j for j in job_ids if j not in self._pending]
        self._pending.update(dict.fromkeys(new))
        if self._pubsub is not None and new:
            try:
                for chunk in _chunks(new):
                    self._pubsub.subscribe(*(keys.result_key(j) for j in chunk))
            except redis.RedisError:
                self._drop_pubsub()
        self._next_sweep = 0.0  # results stored before we subscribed

    def wait(self, timeout: float) -> list[Outcome]:
        """The outcomes stored since the last call, waiting up to ``timeout`` s for the first."""
        deadline = time.monotonic() + timeout
        try:
            if self._pubsub is None:
                self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                for chunk in _chunks(list(self._pending)):
                    self._pubsub.subscribe(*(keys.result_key(j) for j in chunk))
                self._next_sweep = 0.0
            while self._pending:
                now = time.monotonic()
                if now >= self._next_sweep:
                    self._next_sweep = now + self._poll_s
                    found = self._sweep()
                    if found:
                        return found
                    continue
                if now >= deadline:
                    return []
                message = self._pubsub.get_message(timeout=min(deadline, self._next_sweep) - now)
                if message is None or message["type"] != "message":
                    continue
                job_id = message["channel"].decode()[len(keys.RESULT_KEY_PREFIX):]
                outcome = decode_meta(job_id, message["data"])
                if outcome is not None and job_id in self._pending:
                    del self._pending[job_id]
                    with contextlib.suppress(redis.RedisError):
                        self._pubsub.unsubscribe(message["channel"])
                    return [outcome, *self._drain()]
            return []
        except (redis.ConnectionError, redis.TimeoutError):
            self._drop_pubsub()
            raise

    def _drain(self) -> list[Outcome]:
        """Outcomes already delivered on the connection, without waiting."""
        found = []
        assert self._pubsub is not None
        while (message := self._pubsub.get_message(timeout=0)) is not None:
            if message["type"] != "message":
                continue
            job_id = message["channel"].decode()[len(keys.RESULT_KEY_PREFIX):]
            outcome = decode_meta(job_id, message["data"])
            if outcome is not None and job_id in self._pending:
                del self._pending[job_id]
                found.append(outcome)
        return found

    def _sweep(self) -> list[Outcome]:
        found = []
        for chunk in _chunks(list(self._pending)):
            for job_id, raw in zip(chunk, self._redis.mget([keys.result_key(j) for j in chunk]), strict=True):
                outcome = decode_meta(job_id, raw)
                if outcome is not None:
                    del self._pending[job_id]
                    found.append(outcome)
        if found and self._pubsub is not None:
            with contextlib.suppress(redis.RedisError):
                for chunk in _chunks([o.id if isinstance(o, JobResult) else o.job_id for o in found]):
                    self._pubsub.unsubscribe(*(keys.result_key(j) for j in chunk))
        return found

    def _drop_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                self._pubsub.close()
            self._pubsub = None

    def close(self) -> None:
        self._drop_pubsub()

    def __enter__(self) -> OutcomeWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(items: list[str], size: int = CHUNK) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
