"""The Celery configuration producers and workers share: broker, results, JSON only, events."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis
import redis.asyncio
from celery import Celery

from producer import connections, keys
from producer.errors import RedisFull
from producer.settings import Settings


def make_celery(settings: Settings, name: str = "vqueue", results: bool = True) -> Celery:
    """A Celery app speaking vqueue's wire format to ``settings.redis.url``.

    ``results=False`` (producers) leaves out Celery's result backend: the client reads
    results from Redis itself, and Celery's backend would subscribe to every job's result
    channel at send time. Workers add their own options on top (see ``worker.celery_app``).
    """
    backend = settings.redis.url if results else None
    app = Celery(name, broker=settings.redis.url, backend=backend, set_as_current=False)
    app.conf.update(
        # JSON only, both ways: a pickled message is refused (pickle runs code on load).
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        broker_transport_options={**lease_options(settings), **priority_options(),
                                  **connections.celery_transport_options(settings)},
        result_backend_transport_options=connections.celery_transport_options(settings),
        result_expires=settings.redis.result_ttl_s,
        # One result backend (one Redis connection pool) for all pool threads: Celery otherwise
        # builds a backend and a Redis client per thread, on each thread's first job, inside the
        # first burst (a third of the worker's CPU in that burst on the H200). redis-py's pool
        # is thread-safe.
        result_backend_thread_safe=True,
        # A result written while Redis restarts waits for it instead of being lost.
        result_backend_always_retry=True,
        result_backend_max_retries=120,
        broker_connection_retry_on_startup=True,
        enable_utc=True,
    )
    return app


def lease_options(settings: Settings) -> dict:
    """kombu's Redis transport options that make ``redis.lease_s`` a lease (see ``worker.leases``).

    A message a worker holds stays in ``unacked`` scored by when it was delivered; kombu puts
    it back on its queue once the score is older than ``visibility_timeout``. Live workers
    renew the scores of the messages they hold, so only a dead worker's leases run out. kombu's
    own sweep would look only every 100 s (10 s x a throttle of 10) and restore 10 messages a
    time; here every live worker sweeps every ``lease_s / 6`` s, all expired leases at once,
    under a lock that a worker dying mid-sweep holds for at most ``lease_s``.
    """
    lease = settings.redis.lease_s
    return {
        "visibility_timeout": lease,
        "unacked_restore_interval": max(1, lease // 6),
        "unacked_restore_throttle": 1,
        "unacked_restore_limit": 100_000,
        "unacked_mutex_expire": lease,
        "unacked_key": keys.UNACKED_KEY,
        "unacked_index_key": keys.UNACKED_INDEX_KEY,
        "unacked_mutex_key": keys.UNACKED_MUTEX_KEY,
    }


def priority_options() -> dict:
    """kombu's Redis transport options for vqueue's ten priorities (``producer.keys``).

    kombu keeps one Redis list per priority step and BRPOPs them in step order, so a worker
    always takes a message of the most urgent non-empty step (its own default is 4 steps).
    """
    return {"priority_steps": list(keys.PRIORITIES)}


@dataclass
class Outgoing:
    """One job on its way: the Celery task, its queue, the JSON payload, what Flower shows,
    and blobs (Redis key, bytes) the payload refers to."""

    task: str
    job_id: str
    queue: str
    payload: dict
    argsrepr: str
    blobs: list[tuple[str, bytes]] = field(default_factory=list)
    #: vqueue's priority (0-9, higher first), and the deadline (epoch s) Celery expires it at.
    priority: int = 5
    deadline: float | None = None
    #: The job's record (``producer.records``); written in the same pipeline as the message.
    record: dict[str, str | int | float] | None = None


class JobPublisher:
    """Puts many jobs on their queues in pipelined Redis round trips.

    Celery's ``send_task`` costs two Redis round trips and ~300 us of Python per job (about
    3,000 jobs/s from one process, measured); this builds the same messages with Celery's
    own ``create_task_message`` and writes them as kombu's Redis transport would (the JSON
    envelope ``_put`` LPUSHes for the default exchange), 1,000 per pipeline. Queues are
    declared through kombu once per publisher. Flower's "task-sent" events are not sent
    on this path; workers' events (received, started, succeeded) are.
    """

    def __init__(self, app: Celery, client: redis.Redis) -> None:
        self._app = app
        self._client = client
        self._declared: set[str] = set()

    def declared(self, queue: str) -> bool:
        return queue in self._declared

    def declare(self, queue: str) -> None:
        """Declare ``queue`` through kombu (its bindings), once per publisher. Blocking I/O:
        async code runs it in a thread, once per queue (``producer.aio``)."""
        if queue not in self._declared:
            with self._app.producer_or_acquire() as producer:
                producer.maybe_declare(self._app.amqp.queues[queue])
            # The backlog metrics read the queues of the models in this set (producer.backlog).
            self._client.sadd(keys.MODELS_KEY, queue.removeprefix(keys.QUEUE_PREFIX))
            self._declared.add(queue)

    def envelope(self, task: str, job_id: str, queue: str, payload: dict, argsrepr: str, priority: int | None = None,
                 deadline: float | None = None) -> str:
        """kombu's message as ``send_task(..., priority=keys.kombu_priority(priority), expires=deadline)``
        would publish it (``priority`` None: kombu's default step 0)."""
        expires = datetime.fromtimestamp(deadline, UTC) if deadline is not None else None
        message = self._app.amqp.create_task_message(job_id, task, [payload], {}, argsrepr=argsrepr, kwargsrepr="{}",
                                                     expires=expires)
        properties = {**message.properties, "delivery_mode": 2,
                      "priority": keys.kombu_priority(priority) if priority is not None else 0,
                      "body_encoding": "base64", "delivery_info": {"exchange": "", "routing_key": queue},
                      "delivery_tag": str(uuid.uuid4())}
        if deadline is not None:  # kombu's per-message TTL (ms); Redis ignores it, Celery's header decides
            properties["expiration"] = str(int(max(0.0, deadline - time.time()) * 1000))
        return json.dumps({
            "body": base64.b64encode(json.dumps(message.body).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": message.headers,
            "properties": properties,
        })  # fmt: skip

    def stage(self, pipe: redis.client.Pipeline | redis.asyncio.client.Pipeline, m: Outgoing, blob_ttl_s: int) -> int:
        """Add ``m``'s writes to ``pipe``: its blobs before its message, its record (``enqueued_at``
        stamped now) with it, the message on the list of its priority. Returns the commands added.
        Both redis-py pipelines (sync and asyncio) buffer commands without I/O, so ``Client``
        and ``producer.aio.AsyncClient`` send the same writes; the queue must be declared."""
        for key, data in m.blobs:
            pipe.set(key, data, ex=blob_ttl_s)
        envelope = self.envelope(m.task, m.job_id, m.queue, m.payload, m.argsrepr, m.priority, m.deadline)
        added = len(m.blobs) + 1
        if m.record is not None:
            record_key = keys.job_key(m.job_id)
            pipe.hset(record_key, mapping={**m.record, "enqueued_at": repr(time.time())})
            pipe.expire(record_key, blob_ttl_s)
            added += 2
        pipe.lpush(keys.priority_list(m.queue, m.priority), envelope)
        return added

    def publish(self, messages: Iterable[Outgoing], blob_ttl_s: int, chunk: int = 1000) -> None:
        """Send ``messages`` in order, in transactions of about ``chunk`` commands (``stage``):
        each all or nothing, so a Redis at its maxmemory (``RedisFull``) has taken a known
        first part of them."""
        messages = list(messages)
        sent = staged = 0
        with self._client.pipeline(transaction=True) as pipe:
            try:
                pending = 0
                for m in messages:
                    self.declare(m.queue)
                    pending += self.stage(pipe, m, blob_ttl_s)
                    staged += 1
                    if pending >= chunk:
                        pipe.execute()
                        sent, pending = staged, 0
                if pending:
                    pipe.execute()
                    sent = staged
            except (redis.exceptions.OutOfMemoryError, redis.exceptions.ExecAbortError) as exc:
                raise RedisFull(sent, len(messages), exc) from None
