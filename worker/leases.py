"""Leases on the jobs a worker holds: renewed while it lives, so only a dead worker's run out.

kombu's Redis transport keeps every message a worker has taken but not yet acknowledged in
``unacked`` (the message) and ``unacked_index`` (delivery tag -> when it was delivered). Any
worker's periodic sweep puts a message whose score is older than ``redis.lease_s`` back on
its queue (``producer.transport.lease_options``). That alone would redeliver a job that
legitimately runs longer than the lease while it still runs. This thread renews the score of
every message this worker holds (``ZADD XX``: only entries that still exist, so an ack or a
restore in between is never undone) every ``lease_s / 6`` seconds, from the first job to
the last one of a warm shutdown. A worker that is SIGKILLed, hung, or cut off from Redis
stops renewing, and its jobs run elsewhere within about ``lease_s`` plus one sweep.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery.worker import state

from producer import keys

log = logging.getLogger(__name__)


def held_delivery_tags() -> list[str]:
    """The delivery tags of every job this worker holds: taken from the queue, not yet acked.

    Celery adds a request to ``reserved_requests`` when its message arrives (before the job
    starts) and drops it once the job is done, in both cases from the consumer thread.
    """
    for _ in range(10):
        try:
            return [r.message.delivery_tag for r in list(state.reserved_requests)]
        except RuntimeError:  # the set changed while we copied it; copy again
            continue
    return []


class LeaseKeeper:
    def __init__(self, client: redis.Redis, lease_s: float) -> None:
        self._client = client
        self.interval_s = lease_s / 6
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vqueue-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def renew(self) -> int:
        """Renew every held lease now; returns how many were renewed."""
        tags = held_delivery_tags()
        if not tags:
            return 0
        return int(self._client.zadd(keys.UNACKED_INDEX_KEY, dict.fromkeys(tags, time.time()), xx=True, ch=True))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except redis.RedisError as exc:  # Redis away for a moment: the next beat tries again
                log.warning("could not renew job leases (%s); retrying in %.0f s", exc, self.interval_s)

    def stop(self) -> None:
        self._stop.set()
