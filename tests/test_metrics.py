"""Metrics as operators read them: a real Prometheus (Debian's binary, on a free port, scraping
every second) scrapes the session's real worker (``metrics.port``) and the real ``vqueue
gateway`` (``GET /metrics``), and PromQL over its HTTP API must show a known set of jobs: three
succeed, one fails with ``InvalidJob``, one is cancelled while it runs. The worker is shared
with other tests, so every count is a difference from a baseline read once nothing was in
flight. The dashboard's every query (``deploy/grafana/vqueue-dashboard.json``) runs against
the same Prometheus after the same jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from devtools.gateway_process import GatewayProcess, start_gateway
from devtools.prometheus_server import PrometheusServer
from devtools.redis_server import RedisServer, free_port
from producer import Client, CompletionJob, JobCancelled, JobFailed, JobResult, Sampling, Settings, keys
from tests.conftest import MODEL, ROOT

#: A model no worker serves: its job waits in the queue, for the backlog gauges.
UNSERVED = "tiny-metrics-unserved"
DASHBOARD = ROOT / "deploy" / "grafana" / "vqueue-dashboard.json"
W = f'model="{MODEL}"'
#: What the known jobs change, as PromQL over the worker's series.
COUNTS = {
    "succeeded": f'sum(vqueue_jobs_finished_total{{{W},outcome="succeeded"}})',
    "invalid": f'sum(vqueue_jobs_finished_total{{{W},outcome="failed",error_type="InvalidJob"}})',
    "cancelled": f'sum(vqueue_jobs_finished_total{{{W},outcome="cancelled"}})',
    "attempts": f"sum(vqueue_job_attempts_total{{{W}}})",
    "prompt_tokens": f"sum(vqueue_prompt_tokens_total{{{W}}})",
    "generation_tokens": f"sum(vqueue_generation_tokens_total{{{W}}})",
    **{name: f"sum(vqueue_job_{name}_seconds_count{{{W}}})" for name in
       ("queue_wait", "engine_wait", "time_to_first_token", "time_per_output_token", "end_to_end")},
}  # fmt: skip
SHORT = Sampling(max_tokens=8, temperature=0, ignore_eos=True)
#: Long enough that Prometheus sees it running (engine stats every 0.5 s, a scrape every 1 s) well
#: before it ends: eight sequences of 900 tokens (one of 900 ended first once, on a loaded CI machine).
LONG = Sampling(max_tokens=900, temperature=1.0, seed=7, n=8, ignore_eos=True)


@pytest.fixture(scope="module")
def exporter_port(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """``vqueue exporter --port P`` on the session's Redis (the backlog without a gateway)."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("exporter") / "exporter.log", "wb")  # noqa: SIM115 - closed below
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VQUEUE_")},
           "VQUEUE_REDIS__URL": redis_server.url}
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "exporter", "--port", str(port)], env=env,
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def prometheus(worker, gateway: GatewayProcess, worker_metrics_port: int, exporter_port: int,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    targets = {"vqueue-worker": [f"127.0.0.1:{worker_metrics_port}"],
               "vqueue-gateway": [gateway.base.removeprefix("http://")],
               "vqueue-exporter": [f"127.0.0.1:{exporter_port}"]}
    with PrometheusServer(targets, tmp_path_factory.mktemp("prometheus"), scrape_interval_s=1.0) as prom:
        prom.wait_targets_up()
        yield prom


@dataclass
class KnownJobs:
    before: dict[str, float]
    succeeded: list[JobResult]
    failed: JobFailed
    cancelled: JobCancelled
    unserved_id: str


def _now(prom: PrometheusServer, promql: str) -> float:
    return sum(float(s["value"][1]) for s in prom.query(promql))  # no series yet: 0


@pytest.fixture(scope="module")
def known_jobs(prometheus: PrometheusServer, redis_server: RedisServer, tokenizer) -> Iterator[KnownJobs]:
    # Given: a worker with nothing in flight, seen so by Prometheus (every earlier job counted)
    assert prometheus.wait_for(f"sum(vqueue_jobs_in_flight{{{W}}})", 0) == 0
    before = {name: _now(prometheus, q) for name, q in COUNTS.items()}
    r = redis.Redis.from_url(redis_server.url)
    with Client(Settings(redis={"url": redis_server.url})) as client:
        # When: three jobs succeed, one fails as InvalidJob (prompt + max_tokens over the context),
        ids = client.submit_many([CompletionJob(model=MODEL, prompt=f"metrics {i}", sampling=SHORT) for i in range(3)])
        succeeded = [client.result(i, timeout=120) for i in ids]
        bad = client.submit(CompletionJob(model=MODEL, prompt="word " * 1000, sampling=Sampling(max_tokens=200)))
        [failed] = client.as_completed([bad], timeout=120)
        # one is cancelled while it runs (after the engine's own figures show it running),
        long = client.submit(CompletionJob(model=MODEL, prompt="metrics long", sampling=LONG))
        deadline = time.monotonic() + 60
        while not r.exists(keys.attempt_key(long)) and time.monotonic() < deadline:
            time.sleep(0.02)
        seen_at = time.monotonic()
        # (vLLM runs each of the n=8 sequences as a request of its own: "at least one" is the claim)
        running = prometheus.wait_for(f"clamp_max(sum(vqueue_engine_requests_running{{{W}}}), 1)", 1)
        said = client.cancel(long)
        assert said.startswith("cancelling: running on"), \
            f"the long job ended before its cancel ({said}; Prometheus took {time.monotonic() - seen_at:.1f} s)"
        [cancelled] = client.as_completed([long], timeout=60)
        # and one waits for a model no worker serves.
        unserved_id = client.submit(CompletionJob(model=UNSERVED, prompt="nobody serves me", sampling=SHORT,
                                                  priority=7))
        assert running == 1, "vLLM's running requests never reached Prometheus while the long job ran"
        try:
            yield KnownJobs(before, succeeded, failed, cancelled, unserved_id)
        finally:
            client.purge(UNSERVED)
            r.close()


def _delta(prom: PrometheusServer, run: KnownJobs, name: str, expected: float) -> float:
    """The change of ``COUNTS[name]`` since the baseline, once the scrapes show ``expected`` (or 30 s)."""
    return prom.wait_for(COUNTS[name], run.before[name] + expected) - run.before[name]


def test_job_outcomes_are_counted_by_outcome_and_error_type(prometheus: PrometheusServer,
                                                            known_jobs: KnownJobs) -> None:
    assert known_jobs.failed.error_type == "InvalidJob"
    assert isinstance(known_jobs.cancelled, JobCancelled) and known_jobs.cancelled.partial is not None
    assert _delta(prometheus, known_jobs, "succeeded", 3) == 3
    assert _delta(prometheus, known_jobs, "invalid", 1) == 1
    assert _delta(prometheus, known_jobs, "cancelled", 1) == 1
    assert _delta(prometheus, known_jobs, "attempts", 5) == 5
    assert prometheus.wait_for(f"sum(vqueue_jobs_in_flight{{{W}}})", 0) == 0


def test_token_counters_add_up_the_results_usage(prometheus: PrometheusServer, known_jobs: KnownJobs) -> None:
    partial = known_jobs.cancelled.partial
    ran = [*known_jobs.succeeded, partial]
    generated = sum(r.usage.completion_tokens for r in ran)
    assert generated == 3 * SHORT.max_tokens + partial.usage.completion_tokens  # the stopped job's tokens count too
    assert _delta(prometheus, known_jobs, "generation_tokens", generated) == generated
    prompt = sum(r.usage.prompt_tokens for r in ran)
    assert _delta(prometheus, known_jobs, "prompt_tokens", prompt) == prompt


@pytest.mark.parametrize("histogram", ["queue_wait", "engine_wait", "time_to_first_token", "time_per_output_token",
                                       "end_to_end"])
def test_latency_histograms_hold_each_succeeded_job(prometheus: PrometheusServer, known_jobs: KnownJobs,
                                                    histogram: str) -> None:
    assert _delta(prometheus, known_jobs, histogram, 3) == 3
    # The buckets hold them too: the +Inf bucket equals the count, and a median over them parses.
    name = f"vqueue_job_{histogram}_seconds"
    assert _now(prometheus, f'sum({name}_bucket{{{W},le="+Inf"}})') == _now(prometheus, f"sum({name}_count{{{W}}})")
    [median] = prometheus.query(f"histogram_quantile(0.5, sum by (le) ({name}_bucket{{{W}}}))")
    assert float(median["value"][1]) >= 0


def test_engine_figures_come_from_vllm(prometheus: PrometheusServer, known_jobs: KnownJobs) -> None:
    # Idle again: vLLM's scheduler reports no request running or waiting; the KV cache is a fraction
    assert prometheus.wait_for(f"sum(vqueue_engine_requests_running{{{W}}})", 0) == 0
    assert prometheus.value(f"sum(vqueue_engine_requests_waiting{{{W}}})") == 0
    assert 0 <= prometheus.value(f"max(vqueue_engine_kv_cache_usage_ratio{{{W}}})") <= 1
    # Every prompt was looked up in the prefix cache (vLLM's counter, summed as vLLM's own exporter does)
    assert prometheus.value(f"sum(vqueue_engine_prefix_cache_queries_tokens_total{{{W}}})") > 0
    assert len(prometheus.query(f"vqueue_engine_preemptions_total{{{W}}}")) == 1


def test_backlog_of_an_unserved_model_by_priority_and_its_oldest_age(prometheus: PrometheusServer,
                                                                     known_jobs: KnownJobs) -> None:
    # The gateway's /metrics and `vqueue exporter` read the same Redis the same way: both say so
    for job in ("vqueue-gateway", "vqueue-exporter"):
        waiting = f'vqueue_queue_waiting_jobs{{job="{job}",model="{UNSERVED}",priority="7"}}'
        assert prometheus.wait_for(waiting, 1) == 1, job
        assert prometheus.value(f'vqueue_queue_waiting_jobs{{job="{job}",model="{UNSERVED}",priority="5"}}') == 0
        assert prometheus.value(f'sum(vqueue_queue_waiting_jobs{{job="{job}",model="{UNSERVED}"}})') == 1
    # Its age is the job's own wait: positive, and it grows between scrapes
    age = f'vqueue_queue_oldest_waiting_age_seconds{{job="vqueue-gateway",model="{UNSERVED}"}}'
    first = prometheus.value(age)
    assert first > 0
    later = first
    deadline = time.monotonic() + 10
    while later <= first and time.monotonic() < deadline:
        time.sleep(0.3)
        later = prometheus.value(age)
    assert later > first
    # The served model's queue is empty: its series say 0, not absent
    assert prometheus.value(f'sum(vqueue_queue_waiting_jobs{{job="vqueue-gateway",model="{MODEL}"}})') == 0


def test_gateway_counts_requests_by_route_template_and_status(prometheus: PrometheusServer,
                                                              gateway: GatewayProcess) -> None:
    ok = 'sum(vqueue_gateway_requests_total{route="/v1/models",method="GET",status="200"})'
    missing = 'sum(vqueue_gateway_requests_total{route="other",method="GET",status="404"})'
    before_ok, before_missing = _now(prometheus, ok), _now(prometheus, missing)
    urllib.request.urlopen(gateway.base + "/v1/models", timeout=10).close()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(gateway.base + "/no/such/path/12345", timeout=10)
    assert info.value.code == 404
    assert prometheus.wait_for(ok, before_ok + 1) == before_ok + 1
    assert prometheus.wait_for(missing, before_missing + 1) == before_missing + 1
    # A raw path never becomes a label value (scanners cannot grow the series)
    assert prometheus.query('vqueue_gateway_requests_total{route=~".*12345.*"}') == []


def test_metrics_need_no_api_key_while_the_api_does(redis_server: RedisServer,
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    locked = start_gateway(redis_server.url, tmp_path_factory.mktemp("gateway-keys"),
                           gateway__api_keys='["sk-metrics-test"]')
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(locked.base + "/v1/models", timeout=10)
        assert info.value.code == 401
        with urllib.request.urlopen(locked.base + "/metrics", timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
        assert "vqueue_queue_waiting_jobs" in text and "vqueue_gateway_requests_total" in text
    finally:
        locked.close()


# -- the dashboard ---------------------------------------------------------------------------


def dashboard_exprs(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows' nested panels included."""
    def panels(items: list[dict]) -> Iterator[dict]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    board = json.loads(path.read_text())
    return [(p.get("title", "?"), t["expr"]) for p in panels(board["panels"]) for t in p.get("targets", [])
            if t.get("expr")]


def test_dashboard_covers_what_operators_watch() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs())
    for series in ("vqueue_jobs_finished_total", "vqueue_generation_tokens_total", "vqueue_queue_waiting_jobs",
                   "vqueue_queue_oldest_waiting_age_seconds", "histogram_quantile",
                   "vqueue_engine_kv_cache_usage_ratio", "error_type"):
        assert series in exprs, f"the dashboard has no panel on {series}"


@pytest.mark.parametrize("title,expr", dashboard_exprs())
def test_dashboard_query_parses_and_returns_series(prometheus: PrometheusServer, known_jobs: KnownJobs,
                                                   title: str, expr: str) -> None:
    # Grafana's $__rate_interval and $model, as a dashboard with every model selected would send them
    promql = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
    _delta(prometheus, known_jobs, "succeeded", 3)  # the jobs are in (scraped) before the panel is read
    deadline = time.monotonic() + 20
    result = prometheus.query(promql)  # PrometheusError (bad_data: parse error) if it does not parse
    while not result and time.monotonic() < deadline:  # rate() needs two scrapes after the jobs
        time.sleep(0.5)
        result = prometheus.query(promql)
    assert result, f"panel {title!r}: {promql} returned no series"
