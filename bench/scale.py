"""Two workers through one queue against one worker: throughput, fair shares, exactly-once, late join.

    python -m bench.scale --preset gpu --model DIR --load-format dummy --gpus 0,1     # two GPUs
    python -m bench.scale --preset gpu --model DIR --load-format dummy --gpus 0,0 \\
        --gpu-memory-utilization 0.4                                                 # sharing one GPU
    python -m bench.scale --preset cpu --model .models/tiny-qwen2-vl --jobs 256      # this CPU

One redis-server, one queue. Phase 1: worker 1 alone runs workload A (--jobs), timed.
Phase 2 (late join): the same number of jobs is queued, then worker 2 starts; it must take
some. Phase 3: both workers, warm, run the jobs again, timed. Every job of every phase must
have exactly one result, from its first attempt (the per-job attempt counters in Redis).
Writes bench/results/<label>.json with workload "A2" and ratios {"two/one": x}.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import redis

from bench.measure import JobTiming, summarize
from bench.run import ENGINE, ROOT, SERVED, device, log, mode_env, settings_for, versions
from bench.workloads import PRESETS, build_jobs
from devtools.redis_server import RedisServer
from devtools.worker_process import WorkerProcess
from producer import Client, keys


def run_jobs(client: Client, jobs: list) -> tuple[dict, collections.Counter, int]:
    """Submit all at once; (figures, jobs per worker, jobs not on their first attempt)."""
    t0 = time.perf_counter()
    ids = client.submit_many(jobs)
    timings, per_worker, retried = [], collections.Counter(), 0
    for r in client.as_completed(ids, timeout=3600):
        if not hasattr(r, "usage"):
            raise SystemExit(f"a job failed: {r}")
        timings.append(JobTiming(time.perf_counter() - t0, r.usage.prompt_tokens, r.usage.completion_tokens))
        per_worker[r.worker] += 1
        retried += r.attempt != 1
    assert len(timings) == len(ids), "a job has no result"
    return summarize(timings, time.perf_counter() - t0), per_worker, retried


def attempts_once(r: redis.Redis, ids: list[str]) -> bool:
    """Every job was started exactly once (its attempt counter is 1)."""
    return all(v == b"1" for v in r.mget([keys.attempt_key(i) for i in ids]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(ENGINE), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default=None)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--late-jobs", type=int, default=None, help="jobs queued before worker 2 starts (2 x --jobs)")
    parser.add_argument("--gpus", default="0,1", help="CUDA_VISIBLE_DEVICES of worker 1 and worker 2")
    parser.add_argument("--gpu-memory-utilization", default=None, help="per engine (0.4 when two share a GPU)")
    parser.add_argument("--max-in-flight", default=None, help="worker.max_in_flight of each worker")
    parser.add_argument("--label", default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vqueue-scale-"))
    w = replace(PRESETS[args.preset]["A"], name="A2", jobs=args.jobs)
    gpus = args.gpus.split(",")
    record: dict = {"phases": {}}
    with RedisServer(workdir / "redis") as redis_server:
        env = mode_env(args, redis_server.url)
        if args.gpu_memory_utilization:
            env["VQUEUE_ENGINE__GPU_MEMORY_UTILIZATION"] = args.gpu_memory_utilization
        if args.max_in_flight:
            env["VQUEUE_WORKER__MAX_IN_FLIGHT"] = args.max_in_flight
        client = Client(settings_for(env))
        r = redis.Redis.from_url(redis_server.url)

        def start(n: int) -> WorkerProcess:
            extra = {"CUDA_VISIBLE_DEVICES": gpus[n - 1]} if args.preset == "gpu" else {}
            return WorkerProcess({**env, **extra}, log_path=workdir / f"worker{n}.log", cwd=ROOT,
                                 extra_args=("-n", f"worker{n}@%h"))  # fmt: skip

        one = start(1)
        one.wait_ready(timeout_s=900)
        run_jobs(client, build_jobs(w, SERVED, seed=1000, n=16))  # warm-up
        jobs = build_jobs(w, SERVED, seed=1)
        figures, shares, retried = run_jobs(client, jobs)
        record["phases"]["one"] = {**figures, "per_worker": dict(shares), "not_first_attempt": retried,
                                   "exactly_once": attempts_once(r, [j.id for j in jobs])}  # fmt: skip
        log(f"one worker: {record['phases']['one']}")

        # Late join: the jobs are queued before worker 2 exists.
        # More jobs than worker 1 can finish while worker 2 starts, so that there is work to join.
        late = build_jobs(w, SERVED, seed=2, n=args.late_jobs or 2 * args.jobs)
        ids = client.submit_many(late)
        two = start(2)
        two.wait_ready(timeout_s=900)
        shares = collections.Counter(res.worker for res in client.as_completed(ids, timeout=3600))
        record["phases"]["late_join"] = {"per_worker": dict(shares), "exactly_once": attempts_once(r, ids)}
        log(f"late join: {record['phases']['late_join']}")

        jobs = build_jobs(w, SERVED, seed=3)
        figures, shares, retried = run_jobs(client, jobs)
        record["phases"]["two"] = {**figures, "per_worker": dict(shares), "not_first_attempt": retried,
                                   "exactly_once": attempts_once(r, [j.id for j in jobs])}  # fmt: skip
        log(f"two workers: {record['phases']['two']}")
        for worker in (two, one):
            worker.terminate(timeout_s=300)
        client.close()

    settings = settings_for(mode_env(args))
    record.update({
        "device": device(), "date": datetime.now(UTC).isoformat(timespec="seconds"), "versions": versions(),
        "engine_args": settings.engine.model_dump(), "gpus": args.gpus,
        "gpu_memory_utilization_per_engine": args.gpu_memory_utilization,
        "command": "python -m bench.scale " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                        if v is not None and k not in ("out",)),
        "workload": "A2", "workload_spec": w.describe(),
        "ratios": {"two/one": round(record["phases"]["one"]["wall_s"] / record["phases"]["two"]["wall_s"], 4)},
    })  # fmt: skip
    label = args.label or f"scale-{args.preset}"
    path = Path(args.out) / f"{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([record], indent=2) + "\n")
    log(f"ratios {record['ratios']}; wrote {path}")


if __name__ == "__main__":
    main()
