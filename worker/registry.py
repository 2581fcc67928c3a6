"""The worker's announcement in Redis: which model it serves, renewed while it lives.

A daemon thread rewrites ``vqueue:worker:<hostname>`` every ``worker.heartbeat_s`` with a TTL
of three beats; a worker that dies stops renewing and drops out of ``vqueue models`` within
three beats. A clean shutdown deletes the key at once. Each beat also carries the worker's
load for ``vqueue queue``: jobs running in its pool threads now, and jobs it finished per
second over the last minute (from Celery's own counters, ``celery.worker.state``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import redis
from celery.worker import state

from producer import keys
from producer.protocol import WorkerInfo

log = logging.getLogger(__name__)


#: Completions per second are measured over this window.
LOAD_WINDOW_S = 60.0


class Heartbeat:
    def __init__(self, client: redis.Redis, info: WorkerInfo, interval_s: float) -> None:
        self._client = client
        self._info = info
        self._interval_s = interval_s
        self._key = keys.worker_key(info.hostname)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vqueue-heartbeat", daemon=True)
        #: (monotonic s, jobs finished so far) at each beat of the last minute.
        self._finished: collections.deque[tuple[float, int]] = collections.deque()

    def start(self) -> None:
        # The backlog metrics read the queues of the models in this set (producer.backlog).
        self._client.sadd(keys.MODELS_KEY, self._info.served_name)
        self.beat()
        self._thread.start()

    def load(self) -> dict[str, float | int]:
        """Jobs in flight now, and jobs finished per second over the last minute (or since start)."""
        now, done = time.monotonic(), state.all_total_count[0]
        self._finished.append((now, done))
        while len(self._finished) > 1 and now - self._finished[0][0] > LOAD_WINDOW_S:
            self._finished.popleft()
        since, done_then = self._finished[0]
        rate = (done - done_then) / (now - since) if now > since else 0.0
        return {"in_flight": len(state.active_requests), "completions_per_s": round(rate, 3)}

    def beat(self) -> None:
        ttl_ms = int(self._interval_s * keys.HEARTBEAT_TTL_BEATS * 1000)
        self._client.set(self._key, self._info.model_copy(update=self.load()).model_dump_json(), px=ttl_ms)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.beat()
            except redis.RedisError:  # Redis away for a moment: try again next beat
                log.warning("heartbeat to Redis failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        try:
            self._client.delete(self._key)
        except redis.RedisError:
            log.warning("could not remove %s; it expires by itself", self._key)
