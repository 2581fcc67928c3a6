"""Celery's Redis result backends: the client read without a lock, a result stored in one round trip.

Celery's ``RedisBackend.client`` is a kombu ``cached_property``: a data descriptor that takes
one lock, shared by every backend instance, on every read, cached or not. The pool threads
read it several times per job (the pick-up script, the result's GET and SET, the stream's
end), so in a burst hundreds of threads queued on that one lock: 35-40 % of the worker's GIL
samples in a burst of 1000 one-token jobs on the H200 (bench/results/NOTES.md, workload I).
``functools.cached_property`` is built once and then read from the instance like any
attribute.

Storing a result, Celery GETs the key first (a stored SUCCESS is never overwritten: a job
delivered again after it finished), then SETs and PUBLISHes it in MULTI/EXEC: two round trips
and a decode per job, a tenth of the worker's GIL in the same profile. ``_STORE`` does the same
in one script, atomically (no other write can come between the check and the SET). The backend
is otherwise Celery's own; ``worker.celery_app`` names it by ``url_for``, the "class+url" form
Celery's ``result_backend`` setting accepts.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import states
from celery.backends import redis as celery_redis
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from producer.connections import is_sentinel

#: KEYS[1] the result's key; ARGV[1] the encoded result, ARGV[2] its TTL in seconds (0: none).
_STORE = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta.status == 'SUCCESS' then return 0 end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class RedisBackend(celery_redis.RedisBackend):
    @functools.cached_property
    def client(self) -> Any:
        return self._create_client(**self.connparams)

    @functools.cached_property
    def _store(self) -> Any:
        return self.client.register_script(_STORE)

    def _store_result(self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None,
                      **kwargs: Any) -> Any:
        # Celery's BaseKeyValueStoreBackend._store_result (5.7), its GET and SET as one script.
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        self.ensure(self._store, ([self.get_key_for_task(task_id)], [value, int(expires or 0)]))
        return result


class SentinelBackend(RedisBackend, celery_redis.SentinelBackend):
    """The same on Celery's Sentinel backend (the master asked of the sentinels)."""


def url_for(url: str) -> str:
    """``result_backend`` for ``redis.url``: this module's class, then Celery's URL."""
    return f"{__name__}:{'SentinelBackend' if is_sentinel(url) else 'RedisBackend'}+{url}"
