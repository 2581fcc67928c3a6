"""The README's operations picture: a real run as a real Prometheus saw it.

    python -m bench.ops_plot                       # a short local run, then the picture
    python -m bench.ops_plot --prometheus http://prom:9090 --minutes 30   # any Prometheus, last 30 min
    -> bench/results/ops-metrics.png (and ops-metrics.json: the queried series)

The local run starts a redis-server, the real ``celery -A worker worker`` on the tiny CPU
model (devtools), ``vqueue gateway`` and Debian's ``prometheus`` scraping both every second;
then submits waves of jobs faster than the worker drains them, so a backlog builds and clears,
and one model nobody serves keeps a job waiting. Every line drawn is a PromQL query over
Prometheus's HTTP API (``query_range``), the same expressions as the Grafana dashboard's panels.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-qwen2-vl"
UNSERVED = "tiny-unserved"

#: (panel title, unit, [(legend, PromQL)]): what the picture draws.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Throughput", "per second", [
        ("jobs/s succeeded", 'sum(rate(vqueue_jobs_finished_total{outcome="succeeded"}[5s]))'),
        ("generated tokens/s / 100", "sum(rate(vqueue_generation_tokens_total[5s])) / 100"),
    ]),
    ("Backlog in Redis", "jobs / seconds", [
        (f"jobs waiting, {MODEL}", f'sum(vqueue_queue_waiting_jobs{{model="{MODEL}"}})'),
        (f"oldest's age (s), {MODEL}", f'max(vqueue_queue_oldest_waiting_age_seconds{{model="{MODEL}"}})'),
        (f"jobs waiting, {UNSERVED} (no worker)", f'sum(vqueue_queue_waiting_jobs{{model="{UNSERVED}"}})'),
    ]),
    ("Latency percentiles (over 10 s windows)", "seconds", [
        (f"end to end p{int(q * 100)}",
         f"histogram_quantile({q}, sum by (le) (rate(vqueue_job_end_to_end_seconds_bucket[10s])))")
        for q in (0.5, 0.95)
    ] + [
        ("time to first token p50",
         "histogram_quantile(0.5, sum by (le) (rate(vqueue_job_time_to_first_token_seconds_bucket[10s])))"),
        ("wait in Redis p95",
         "histogram_quantile(0.95, sum by (le) (rate(vqueue_job_queue_wait_seconds_bucket[10s])))"),
    ]),
    ("Engine (vLLM's own stats)", "requests / %", [
        ("running", "sum(vqueue_engine_requests_running)"),
        ("waiting in the engine", "sum(vqueue_engine_requests_waiting)"),
        ("KV cache used (%)", "100 * max(vqueue_engine_kv_cache_usage_ratio)"),
    ]),
]  # fmt: skip


def query(base: str, start: float, end: float, step_s: float) -> dict[str, list[tuple[str, list[list[float]]]]]:
    """Every panel's series over [start, end]: title -> [(legend, [[t, v], ...])]."""
    from devtools.prometheus_server import PrometheusClient

    prom = PrometheusClient(base)
    out: dict[str, list[tuple[str, list[list[float]]]]] = {}
    for title, _, lines in PANELS:
        out[title] = []
        for legend, promql in lines:
            series = prom.query_range(promql, start, end, step_s)
            values = [[float(t), float(v)] for s in series[:1] for t, v in s["values"]]
            out[title].append((legend, values))
    return out


def plot(data: dict[str, list[tuple[str, list[list[float]]]]], start: float, out: Path, note: str) -> None:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9, 2.6 * len(PANELS)), sharex=True)
    for ax, (title, unit, _) in zip(axes, PANELS, strict=True):
        for legend, values in data[title]:
            points = [(t - start, v) for t, v in values if not math.isnan(v)]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=legend, linewidth=1.4)
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel(unit, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("seconds into the run")
    fig.suptitle("vqueue as Prometheus scraped it: " + note, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def local_run(jobs_per_wave: int, waves: int, gap_s: float) -> tuple[str, float, float, Any]:
    """Start everything, run the waves; returns (Prometheus URL, start, end, a closer)."""
    from devtools.gateway_process import start_gateway
    from devtools.prometheus_server import PrometheusServer
    from devtools.redis_server import RedisServer, free_port
    from devtools.tiny_model import ensure_tiny_model
    from devtools.worker_process import WorkerProcess, cpu_engine_env, tiny_model_env
    from producer import Client, CompletionJob, Sampling, Settings

    tmp = Path(tempfile.mkdtemp(prefix="vqueue-ops-"))
    started: list[Any] = []
    try:
        redis_server = RedisServer(tmp / "redis")
        started.append(redis_server)
        metrics_port = free_port()
        env = {**cpu_engine_env(tmp / "cache"), **tiny_model_env(ensure_tiny_model(ROOT / ".models" / MODEL),
                                                                 redis_server.url, MODEL),
               "VQUEUE_METRICS__PORT": str(metrics_port), "VQUEUE_WORKER__MAX_IN_FLIGHT": "16"}
        worker = WorkerProcess(env, log_path=tmp / "worker.log", cwd=ROOT)
        started.append(worker)
        gateway = start_gateway(redis_server.url, tmp)
        started.append(gateway)
        worker.wait_ready()
        prom = PrometheusServer({"vqueue-worker": [f"127.0.0.1:{metrics_port}"],
                                 "vqueue-gateway": [gateway.base.removeprefix("http://")]}, tmp / "prometheus")
        started.append(prom)
        prom.wait_ready()
        prom.wait_targets_up()
        start = time.time()
        time.sleep(5)
        with Client(Settings(redis={"url": redis_server.url})) as client:
            client.submit(CompletionJob(model=UNSERVED, prompt="nobody serves me", sampling=Sampling(max_tokens=4)))
            ids: list[str] = []
            for wave in range(waves):
                sampling = Sampling(max_tokens=64 + 64 * (wave % 3), temperature=0, ignore_eos=True)
                ids += client.submit_many([CompletionJob(model=MODEL, prompt=f"wave {wave} job {i}", sampling=sampling)
                                           for i in range(jobs_per_wave)])  # fmt: skip
                time.sleep(gap_s)
            for _ in client.as_completed(ids, timeout=900):
                pass
            client.purge(UNSERVED)
        time.sleep(8)  # the last scrapes after the backlog cleared
        return prom.base, start, time.time(), started
    except BaseException:
        _stop(started)
        raise


def _stop(started: list[Any]) -> None:
    for proc in reversed(started):  # WorkerProcess stops with terminate(), the others with close()
        (getattr(proc, "close", None) or proc.terminate)()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", help="Query this Prometheus (its base URL) instead of a local run.")
    parser.add_argument("--minutes", type=float, default=15, help="With --prometheus: the last this many minutes.")
    parser.add_argument("--waves", type=int, default=5)
    parser.add_argument("--jobs-per-wave", type=int, default=60)
    parser.add_argument("--gap-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "ops-metrics.png")
    args = parser.parse_args()
    closers: list[Any] = []
    if args.prometheus:
        base, end = args.prometheus, time.time()
        start = end - args.minutes * 60
        note = f"{base}, the last {args.minutes:g} min"
    else:
        base, start, end, closers = local_run(args.jobs_per_wave, args.waves, args.gap_s)
        note = (f"a local run on this CPU (tiny model), {args.waves} waves of {args.jobs_per_wave} jobs "
                f"{args.gap_s:g} s apart, scraped every 1 s")
    try:
        data = query(base, start, end, step_s=1.0)
    finally:
        _stop(closers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(data, start, args.out, note)
    args.out.with_suffix(".json").write_text(json.dumps({"note": note, "start": start, "end": end,
                                                         "queries": {t: [(lg, q) for lg, q in lines]
                                                                     for t, _, lines in PANELS},
                                                         "series": data}, indent=1))  # fmt: skip
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
