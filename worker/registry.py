"""The worker's announcement in Redis: which model it serves, renewed while it lives.

A daemon thread rewrites ``vqueue:worker:<hostname>`` every ``worker.heartbeat_s`` with a TTL
of three beats; a worker that dies stops renewing and drops out of ``vqueue models`` within
three beats. A clean shutdown deletes the key at once.
"""

from __future__ import annotations

import logging
import threading

import redis

from producer import keys
from producer.protocol import WorkerInfo

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, client: redis.Redis, info: WorkerInfo, interval_s: float) -> None:
        self._client = client
        self._info = info
        self._interval_s = interval_s
        self._key = keys.worker_key(info.hostname)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vqueue-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        ttl_ms = int(self._interval_s * keys.HEARTBEAT_TTL_BEATS * 1000)
        self._client.set(self._key, self._info.model_dump_json(), px=ttl_ms)

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
