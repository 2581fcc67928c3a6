"""The backlog read from Redis, in one place: jobs waiting per model and priority, and how
long the oldest has waited. ``vqueue queue`` (``Client.queue_stats``), the gateway's
``/metrics`` and ``vqueue exporter`` all read it here.

Cheap enough to scrape every few seconds with many models: two pipelined round trips for all
models together (LLEN and LINDEX -1 of each priority list, then HGET ``enqueued_at`` of each
non-empty list's oldest job), never a KEYS or SCAN. Which models to read comes from the set
``vqueue:models`` (``known_models``: every queue a producer declared, every model a worker
served), not from scanning the keyspace.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from producer import keys


@dataclass(frozen=True)
class Backlog:
    """One model's queue now."""

    model: str
    #: Jobs waiting per vqueue priority (0-9), every priority present, zeros included.
    waiting_by_priority: dict[int, int]
    #: Seconds the oldest waiting job has waited; None when none waits (or it has no record).
    oldest_waiting_s: float | None

    @property
    def waiting(self) -> int:
        return sum(self.waiting_by_priority.values())


def known_models(client: redis.Redis) -> list[str]:
    """Every model with a queue: those producers declared (``JobPublisher.declare``) or workers
    served (``worker.registry``), sorted. One SMEMBERS."""
    return sorted(m.decode() for m in client.smembers(keys.MODELS_KEY))


def depths(client: redis.Redis, models: list[str]) -> dict[str, dict[int, int]]:
    """Jobs waiting per model and priority, in one round trip (what ``submit`` checks its
    ``queue.max_backlog`` against)."""
    with client.pipeline(transaction=False) as pipe:
        for model in models:
            for name in keys.queue_lists(model).values():
                pipe.llen(name)
        lengths = iter(pipe.execute())
    return {model: {p: next(lengths) for p in keys.queue_lists(model)} for model in models}


def read(client: redis.Redis, models: list[str], now: float | None = None) -> list[Backlog]:
    """Each of ``models``' backlog, in two pipelined round trips whatever the number of models.

    kombu LPUSHes and workers BRPOP, so the tail of each priority list is its oldest message;
    the oldest of those tails, by the ``enqueued_at`` in its job's record, is the model's oldest.
    """
    lists = [(model, p, name) for model in models for p, name in keys.queue_lists(model).items()]
    with client.pipeline(transaction=False) as pipe:
        for _, _, name in lists:
            pipe.llen(name)
            pipe.lindex(name, -1)
        replies = pipe.execute()
    waiting: dict[str, dict[int, int]] = {model: {} for model in models}
    tails: list[tuple[str, str]] = []  # (model, job id) of each non-empty list's oldest job
    for (model, p, _), length, tail in zip(lists, replies[::2], replies[1::2], strict=True):
        waiting[model][p] = length
        job_id = job_id_of(tail) if length and tail else None
        if job_id is not None:
            tails.append((model, job_id))
    oldest: dict[str, float] = {}
    if tails:
        with client.pipeline(transaction=False) as pipe:
            for _, job_id in tails:
                pipe.hget(keys.job_key(job_id), "enqueued_at")
            for (model, _), at in zip(tails, pipe.execute(), strict=True):
                if at is not None:
                    oldest[model] = min(float(at), oldest.get(model, float("inf")))
    now = time.time() if now is None else now
    return [Backlog(model, waiting[model], max(0.0, now - oldest[model]) if model in oldest else None)
            for model in models]


def job_id_of(envelope: bytes) -> str | None:
    """The job id in a queued message (kombu's envelope; Celery's ``id`` header)."""
    try:
        job_id = json.loads(envelope)["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None
    return job_id if isinstance(job_id, str) else None
