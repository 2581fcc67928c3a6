"""Celery's Redis result backends, with their Redis client read without a lock.

Celery's ``RedisBackend.client`` is a kombu ``cached_property``: a data descriptor that takes
one lock, shared by every backend instance, on every read, cached or not. The pool threads
read it several times per job (the pick-up script, the result's GET and SET, the stream's
end), so in a burst hundreds of threads queued on that one lock: 35-40 % of the worker's GIL
samples in a burst of 1000 one-token jobs on the H200 (bench/results/NOTES.md, workload I).
``functools.cached_property`` is built once and then read from the instance like any
attribute. The backend is otherwise Celery's own; ``worker.celery_app`` names it by
``url_for``, the "class+url" form Celery's ``result_backend`` setting accepts.
"""

from __future__ import annotations

import functools
from typing import Any

from celery.backends import redis as celery_redis

from producer.connections import is_sentinel


class RedisBackend(celery_redis.RedisBackend):
    @functools.cached_property
    def client(self) -> Any:
        return self._create_client(**self.connparams)


class SentinelBackend(RedisBackend, celery_redis.SentinelBackend):
    """The same on Celery's Sentinel backend (the master asked of the sentinels)."""


def url_for(url: str) -> str:
    """``result_backend`` for ``redis.url``: this module's class, then Celery's URL."""
    return f"{__name__}:{'SentinelBackend' if is_sentinel(url) else 'RedisBackend'}+{url}"
