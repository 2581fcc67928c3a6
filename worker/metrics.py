"""The worker's Prometheus metrics, served on ``metrics.port`` (names: ``producer.metrics``).

Every job a worker takes ends in one of Celery's task states, and Celery's ``task_postrun``
signal carries that state and the task's return value or exception: that is the one place
each outcome is observed (``WorkerMetrics.job_ended``), the task itself stays as it was.

* SUCCESS: the stored ``JobResult`` (its timings feed the latency histograms, its usage the
  token counters). A finished job delivered again returns its stored result without running;
  its ``started_at`` predates this delivery, and it is not counted twice.
* FAILURE: the ``WireError`` the task raised; its class is the ``error_type`` producers see
  (``Quarantined`` is its own outcome).
* REJECTED: handed back to the queue ("requeued").
* IGNORED: ``worker.job_control.Stopped`` says "cancelled" or "expired", with the partial
  result if there was one; any other ``Ignore`` is a redelivered job whose outcome was stored
  before, not counted again.

One outcome never reaches the task: Celery drops a queued message whose deadline passed at
pickup; its ``task_revoked`` signal (``expired=True``) counts it "expired".
The engine's own figures arrive from the engine process (``worker.engine_stats``) and are
exported as vLLM reported them (``EngineCollector``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from celery.exceptions import Reject
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from producer import metrics as m
from producer.errors import WIRE_ERRORS, Quarantined
from worker.engine_stats import FIELDS

log = logging.getLogger(__name__)


class WorkerMetrics:
    """One worker process's metrics, in a registry of its own (``serve`` exposes it)."""

    def __init__(self, model: str) -> None:
        self.model = model
        #: Celery's hostname, known once the worker starts (``bind``); jobs run only after that.
        self.worker = "unknown"
        disable_created_metrics()  # no *_created series beside each counter: nothing here reads them
        self.registry = CollectorRegistry()
        r = self.registry
        self._finished = Counter(m.JOBS_FINISHED.name, m.JOBS_FINISHED.help, m.JOBS_FINISHED.labels, registry=r)
        self._in_flight = Gauge(m.JOBS_IN_FLIGHT.name, m.JOBS_IN_FLIGHT.help, m.JOBS_IN_FLIGHT.labels, registry=r)
        self._attempts = Counter(m.JOB_ATTEMPTS.name, m.JOB_ATTEMPTS.help, m.JOB_ATTEMPTS.labels, registry=r)
        self._latency = {
            metric.name: Histogram(metric.name, metric.help, metric.labels, registry=r, buckets=buckets)
            for metric, buckets in ((m.QUEUE_WAIT, m.LATENCY_BUCKETS_S), (m.ENGINE_WAIT, m.LATENCY_BUCKETS_S),
                                    (m.TIME_TO_FIRST_TOKEN, m.LATENCY_BUCKETS_S), (m.END_TO_END, m.LATENCY_BUCKETS_S),
                                    (m.TIME_PER_OUTPUT_TOKEN, m.TOKEN_LATENCY_BUCKETS_S))
        }  # fmt: skip
        self._prompt_tokens = Counter(m.PROMPT_TOKENS.name, m.PROMPT_TOKENS.help, m.PROMPT_TOKENS.labels, registry=r)
        self._generation_tokens = Counter(m.GENERATION_TOKENS.name, m.GENERATION_TOKENS.help,
                                          m.GENERATION_TOKENS.labels, registry=r)  # fmt: skip
        self.engine = EngineCollector(self)
        r.register(self.engine)
        #: Task id -> when its delivery started here (``task_prerun``).
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def bind(self, worker: str) -> None:
        """Name the worker; every outcome's series starts at 0, so that ``increase()`` sees the first job."""
        self.worker = worker
        for outcome in m.OUTCOMES:
            for error_type in ([*WIRE_ERRORS] if outcome == "failed" else [""]):
                if error_type != "Quarantined":
                    self._finished.labels(self.model, worker, outcome, error_type)
        self._in_flight.labels(self.model, worker)
        self._attempts.labels(self.model, worker)
        self._prompt_tokens.labels(self.model, worker)
        self._generation_tokens.labels(self.model, worker)

    def serve(self, host: str, port: int) -> bool:
        """Serve ``/metrics`` on ``host:port`` from a thread; False (and a logged error) if the port is
        taken: the worker runs its jobs anyway, and Prometheus shows the target down."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%d (%s); this worker exports no metrics. Give each worker on a "
                      "host its own metrics.port (VQUEUE_METRICS__PORT), or 0 for none", host, port, exc)
            return False
        log.info("metrics on http://%s:%d/metrics", host, port)
        return True

    # -- jobs (Celery's signals, on the pool threads) -------------------------------------

    def job_started(self, task_id: str) -> None:
        with self._lock:
            self._started[task_id] = time.time()
        self._in_flight.labels(self.model, self.worker).inc()
        self._attempts.labels(self.model, self.worker).inc()

    def job_ended(self, task_id: str, state: str, retval: Any) -> None:
        """Count the outcome of one delivery from Celery's final state and the task's return value."""
        with self._lock:
            started = self._started.pop(task_id, None)
        if started is None:
            return  # not a task this worker saw start (another task name, or a signal twice)
        try:
            outcome, error_type, result = outcome_of(state, retval)
            if outcome is None:
                return
            if outcome == "succeeded" and result["timings"]["started_at"] < started:
                return  # a finished job delivered again: its stored result, counted when it ran
            if result is not None:
                self._observe_result(result, latencies=outcome == "succeeded")
            self._finished.labels(self.model, self.worker, outcome, error_type).inc()
        finally:
            # Last: a scrape that shows no job in flight has every finished job counted.
            self._in_flight.labels(self.model, self.worker).dec()

    def job_expired_unrun(self) -> None:
        """Celery dropped a queued message whose deadline had passed (no task ran)."""
        self._finished.labels(self.model, self.worker, "expired", "").inc()

    def _observe_result(self, result: dict[str, Any], latencies: bool) -> None:
        usage, t = result["usage"], result["timings"]
        self._prompt_tokens.labels(self.model, self.worker).inc(usage["prompt_tokens"])
        self._generation_tokens.labels(self.model, self.worker).inc(usage["completion_tokens"])
        if not latencies:  # a stopped job's times say when it was stopped, not how fast it ran
            return
        enqueued, first, finished = t["enqueued_at"], t.get("first_token_at"), t["finished_at"]
        spans = {
            m.QUEUE_WAIT.name: t["started_at"] - enqueued,
            m.ENGINE_WAIT.name: _between(t.get("handed_at"), t.get("scheduled_at")),
            m.TIME_TO_FIRST_TOKEN.name: _between(enqueued, first),
            m.END_TO_END.name: finished - enqueued,
            m.TIME_PER_OUTPUT_TOKEN.name: (finished - first) / (usage["completion_tokens"] - 1)
            if first is not None and usage["completion_tokens"] > 1 else None,
        }  # fmt: skip
        for name, seconds in spans.items():
            if seconds is not None:
                # Clocks of two hosts (producer, worker) may disagree by a little: never a negative wait.
                self._latency[name].labels(self.model, self.worker).observe(max(0.0, seconds))

    # -- the engine's own figures (the engine results reader thread) ------------------------

    def engine_stats(self, snapshot: dict[str, float]) -> None:
        self.engine.latest = snapshot


def _between(start: float | None, end: float | None) -> float | None:
    return end - start if start is not None and end is not None else None


def outcome_of(state: str, retval: Any) -> tuple[str | None, str, dict[str, Any] | None]:
    """(outcome, error_type, result dict or None) of a delivery that ended in Celery ``state``
    with ``retval``; outcome None: nothing new ended (a redelivered job's stored outcome)."""
    from worker.job_control import Stopped  # not at the top: job_control imports the app, which imports this

    if state == "SUCCESS":
        return "succeeded", "", retval if isinstance(retval, dict) else None
    if state == "REJECTED" or isinstance(retval, Reject):
        return "requeued", "", None
    if state == "IGNORED":
        if isinstance(retval, Stopped):
            return retval.outcome, "", retval.partial
        return None, "", None
    if isinstance(retval, Quarantined):
        return "quarantined", "", None
    if isinstance(retval, BaseException):
        return "failed", type(retval).__name__, None
    return "failed", state, None


class EngineCollector:
    """The engine's latest figures as the engine process reported them (vLLM's own stats)."""

    def __init__(self, owner: WorkerMetrics) -> None:
        self._owner = owner
        #: The engine process's last snapshot (``worker.engine_stats.FIELDS``); None before the first.
        self.latest: dict[str, float] | None = None

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.latest
        if s is None or set(FIELDS) - set(s):
            return
        labels, values = list(m.ENGINE_RUNNING.labels), [self._owner.model, self._owner.worker]
        for metric, field, family in ((m.ENGINE_RUNNING, "running", GaugeMetricFamily),
                                      (m.ENGINE_WAITING, "waiting", GaugeMetricFamily),
                                      (m.ENGINE_KV_CACHE_USAGE, "kv_cache_usage", GaugeMetricFamily),
                                      (m.ENGINE_PREEMPTIONS, "preemptions", CounterMetricFamily),
                                      (m.ENGINE_PREFIX_CACHE_QUERIES, "prefix_cache_queries", CounterMetricFamily),
                                      (m.ENGINE_PREFIX_CACHE_HITS, "prefix_cache_hits", CounterMetricFamily)):
            f = family(metric.name, metric.help, labels=labels)
            f.add_metric(values, s[field])
            yield f
        age = GaugeMetricFamily(m.ENGINE_STATS_AGE.name, m.ENGINE_STATS_AGE.help, labels=labels)
        age.add_metric(values, max(0.0, time.time() - s["updated_at"]))
        yield age
