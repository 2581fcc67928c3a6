"""Every Prometheus metric vqueue exports, named once: names, help texts, labels and buckets.

Three exporters use these names and nothing else: each worker (``worker.metrics``, on
``metrics.port``), the gateway (``GET /metrics``, ``gateway.metrics``) and ``vqueue exporter``
(the backlog alone, ``producer.exporter``). The README's "Operations: metrics" table and the
Grafana dashboard (``deploy/grafana/vqueue-dashboard.json``) are written against them.

Conventions (Prometheus' own): the unit is in the name (``_seconds``, ``_tokens``, ``_ratio``),
counters end in ``_total``, and every series carries ``model`` (the served model name); the
worker's also carry ``worker`` (its Celery hostname), since each worker process counts its own.
Plain data: importing this needs no prometheus_client, Celery or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Every metric name starts with this.
PREFIX = "vqueue_"


@dataclass(frozen=True)
class Metric:
    """One metric: its full name (a counter's without the ``_total`` that prometheus_client
    appends), what it means, and its label names."""

    name: str
    help: str
    labels: tuple[str, ...]


#: Latencies of a job (waits, time to first token, end to end): from milliseconds (an idle
#: engine, a short prompt) to the tens of minutes a deep backlog or a long generation takes.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1200.0, 1800.0, 3600.0,
)  # fmt: skip
#: Time per output token: about 5-100 ms per decode step on a GPU, slower under a full batch or on a CPU.
TOKEN_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip

W = ("model", "worker")

# -- each worker: jobs -------------------------------------------------------------------

#: ``outcome``: succeeded, failed, cancelled, expired, quarantined, requeued (handed back to the
#: queue: its engine died, or Redis was away at pickup). ``error_type`` is the ``JobFailed``
#: error type of a failed job (``InvalidJob``, ``EngineError``, ...), empty for the others.
JOBS_FINISHED = Metric(f"{PREFIX}jobs_finished", "Jobs this worker finished, by outcome (and error type).",
                       (*W, "outcome", "error_type"))
#: The outcomes ``JOBS_FINISHED`` takes.
OUTCOMES = ("succeeded", "failed", "cancelled", "expired", "quarantined", "requeued")
JOBS_IN_FLIGHT = Metric(f"{PREFIX}jobs_in_flight", "Jobs this worker is running now (its busy pool threads).", W)
JOB_ATTEMPTS = Metric(f"{PREFIX}job_attempts", "Deliveries of a job this worker started (a job handed back "
                      "and run again counts once per delivery).", W)
QUEUE_WAIT = Metric(f"{PREFIX}job_queue_wait_seconds", "Succeeded jobs: from entering Redis to a worker's pickup.", W)
ENGINE_WAIT = Metric(f"{PREFIX}job_engine_wait_seconds", "Succeeded jobs: from entering the engine "
                     "(engine.generate) to vLLM's scheduler's first step for it.", W)
TIME_TO_FIRST_TOKEN = Metric(f"{PREFIX}job_time_to_first_token_seconds", "Succeeded jobs: from entering Redis to "
                             "the first token (what a producer waits for it).", W)
TIME_PER_OUTPUT_TOKEN = Metric(f"{PREFIX}job_time_per_output_token_seconds", "Succeeded jobs of 2 tokens or more: "
                               "decode time after the first token, per further token.", W)
END_TO_END = Metric(f"{PREFIX}job_end_to_end_seconds", "Succeeded jobs: from entering Redis to the last token.", W)
PROMPT_TOKENS = Metric(f"{PREFIX}prompt_tokens", "Prompt tokens of the jobs this worker ran (stopped jobs too).", W)
GENERATION_TOKENS = Metric(f"{PREFIX}generation_tokens", "Tokens generated for the jobs this worker ran (stopped "
                           "jobs' partial output too).", W)

# -- each worker: its engine's own state, from vLLM's stats (not re-derived) ---------------

ENGINE_RUNNING = Metric(f"{PREFIX}engine_requests_running", "Requests in the engine's running batch "
                        "(vLLM's SchedulerStats.num_running_reqs).", W)
ENGINE_WAITING = Metric(f"{PREFIX}engine_requests_waiting", "Requests waiting inside the engine "
                        "(vLLM's SchedulerStats.num_waiting_reqs).", W)
ENGINE_KV_CACHE_USAGE = Metric(f"{PREFIX}engine_kv_cache_usage_ratio", "Fraction of the KV cache in use, 0-1 "
                               "(vLLM's SchedulerStats.kv_cache_usage).", W)
ENGINE_PREEMPTIONS = Metric(f"{PREFIX}engine_preemptions", "Requests the engine preempted (vLLM's "
                            "IterationStats.num_preempted_reqs, summed).", W)
ENGINE_PREFIX_CACHE_QUERIES = Metric(f"{PREFIX}engine_prefix_cache_queries_tokens", "Prompt tokens looked up in the "
                                     "prefix cache (vLLM's PrefixCacheStats.queries, summed).", W)
ENGINE_PREFIX_CACHE_HITS = Metric(f"{PREFIX}engine_prefix_cache_hits_tokens", "Prompt tokens found in the prefix "
                                  "cache (vLLM's PrefixCacheStats.hits, summed).", W)
ENGINE_STATS_AGE = Metric(f"{PREFIX}engine_stats_age_seconds", "How old the engine figures above are (the engine "
                          "process sends them every metrics.engine_stats_interval_s).", W)

# -- the backlog, read from Redis (the gateway's /metrics and `vqueue exporter`) -----------

QUEUE_WAITING = Metric(f"{PREFIX}queue_waiting_jobs", "Jobs waiting in the model's queue (not yet taken by a "
                       "worker), by priority (0-9, higher runs first).", ("model", "priority"))
QUEUE_OLDEST_AGE = Metric(f"{PREFIX}queue_oldest_waiting_age_seconds", "How long the oldest job waiting in the "
                          "model's queue has waited; 0 when none waits.", ("model",))
QUEUE_MAX_BACKLOG = Metric(f"{PREFIX}queue_max_backlog_jobs", "queue.max_backlog for the model (0: unbounded), "
                           "as the reading process's settings say.", ("model",))
BACKLOG_READ_SECONDS = Metric(f"{PREFIX}backlog_read_seconds", "How long reading the backlog from Redis took "
                              "at this scrape.", ())

# -- the gateway --------------------------------------------------------------------------

#: ``route`` is the path template (``/v1/chat/completions``), never a raw path; "other" for none.
GATEWAY_REQUESTS = Metric(f"{PREFIX}gateway_requests", "HTTP requests the gateway answered, by route, method and "
                          "status.", ("route", "method", "status"))
GATEWAY_REQUEST_DURATION = Metric(f"{PREFIX}gateway_request_duration_seconds", "HTTP request time until the "
                                  "response started (a streamed response: until its headers).", ("route", "method"))

#: Default ports: a worker's ``metrics.port``; ``vqueue exporter --port``.
WORKER_PORT = 9400
EXPORTER_PORT = 9401
