"""The backlog as Prometheus metrics: a collector that reads Redis at each scrape.

The gateway's ``GET /metrics`` registers it beside its own request counters; ``vqueue exporter``
serves it alone, for deployments without a gateway. Either way one scrape is one SMEMBERS
plus two pipelined round trips (``producer.backlog``), whatever the number of models and jobs.
A scrape while Redis is away answers without the backlog series (Prometheus shows them
absent) and logs why, rather than failing the whole scrape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from producer import backlog
from producer import metrics as m
from producer.settings import Settings

log = logging.getLogger("vqueue.exporter")


class BacklogCollector(Collector):
    """Jobs waiting per model and priority, the oldest one's age and ``queue.max_backlog``,
    read from Redis when Prometheus scrapes (``collect``)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # registering must not read Redis

    def collect(self) -> Iterator[GaugeMetricFamily]:
        started = time.perf_counter()
        try:
            models = sorted(set(backlog.known_models(self._client)) | set(self._settings.queue.models))
            backlogs = backlog.read(self._client, models)
        except redis.RedisError as exc:
            log.warning("backlog not read from Redis at this scrape (%s); is redis.url right and Redis up?", exc)
            return
        waiting = GaugeMetricFamily(m.QUEUE_WAITING.name, m.QUEUE_WAITING.help, labels=m.QUEUE_WAITING.labels)
        oldest = GaugeMetricFamily(m.QUEUE_OLDEST_AGE.name, m.QUEUE_OLDEST_AGE.help, labels=m.QUEUE_OLDEST_AGE.labels)
        bound = GaugeMetricFamily(m.QUEUE_MAX_BACKLOG.name, m.QUEUE_MAX_BACKLOG.help, labels=m.QUEUE_MAX_BACKLOG.labels)
        for b in backlogs:
            for priority, n in b.waiting_by_priority.items():
                waiting.add_metric([b.model, str(priority)], n)
            oldest.add_metric([b.model], b.oldest_waiting_s or 0.0)
            bound.add_metric([b.model], self._settings.queue.max_backlog_for(b.model))
        yield waiting
        yield oldest
        yield bound
        yield GaugeMetricFamily(m.BACKLOG_READ_SECONDS.name, m.BACKLOG_READ_SECONDS.help,
                                value=time.perf_counter() - started)


def backlog_registry(settings: Settings, client: redis.Redis | None = None) -> CollectorRegistry:
    """A registry holding the backlog collector alone (``vqueue exporter``; the gateway adds its own)."""
    registry = CollectorRegistry()
    registry.register(BacklogCollector(client or redis.Redis.from_url(settings.redis.url), settings))
    return registry


def serve(settings: Settings, host: str, port: int) -> None:
    """Serve the backlog on ``http://host:port/metrics`` until interrupted (``vqueue exporter``)."""
    server, thread = start_http_server(port, addr=host, registry=backlog_registry(settings))
    try:
        while thread.is_alive():
            thread.join(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
