"""Chaos: thousands of jobs through two workers while workers are SIGKILLed and Redis restarts.

    python -m bench.chaos --model .models/tiny-qwen2-vl --jobs 2000          # this CPU (~12 min)

One redis-server with an AOF (``everysec``, as compose runs it), two ``celery -A worker
worker`` on one queue, a short lease (``--lease``). Phase 1, no faults: the jobs are timed.
Phase 2, the same number of new jobs while a loop SIGKILLs a random serving worker's whole
process group every 20-40 s (while the other serves) and starts a new one in its place (as a
supervisor would), and kills
Redis once (SIGKILL, restarted from its files 2 s later). Reports, in
``bench/results/chaos-cpu.json``:

* lost: jobs with no result at the end (must be 0);
* failed: jobs that ended in a failure (must be 0: a kill is never the job's fault);
* rerun: jobs whose result came from a second or later start. Each must have been taken
  (its job record says by whom and when) by a worker that was killed after that
  (``rerun_not_held`` must be 0: else a live worker's job was run twice);
* redelivered but not rerun: a later delivery found the stored result and returned it;
* back_after_s: for each worker kill, how long until the last of its jobs was taken again (a
  lease of ``--lease`` s, then a free slot: the queue is full, so this includes waiting for one);
* throughput with faults against without.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import redis

from bench.run import ROOT, device, log, versions
from devtools.redis_server import RedisServer
from devtools.worker_process import WorkerProcess, cpu_engine_env, tiny_model_env
from producer import Client, CompletionJob, JobResult, Sampling, Settings, keys

MODEL = "chaos"


def make_jobs(n: int, tag: str, max_tokens: int) -> list[CompletionJob]:
    sampling = Sampling(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [CompletionJob(model=MODEL, prompt=f"{tag} job {i}", sampling=sampling) for i in range(n)]


class Fleet:
    """Two named workers that can be killed and replaced."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.generation = env, logs, 0
        self.workers: dict[str, WorkerProcess] = {}

    def start(self, name: str) -> None:
        self.generation += 1
        log_path = self.logs / f"{name}-{self.generation}.log"
        self.workers[name] = WorkerProcess(self.env, log_path=log_path, cwd=ROOT, extra_args=("-n", f"{name}@%h"))

    def stop(self) -> None:
        for w in self.workers.values():
            w.kill()


def run_phase(client: Client, jobs: list[CompletionJob]) -> tuple[float, dict[str, object]]:
    t0 = time.time()
    ids = client.submit_many(jobs)
    outcomes = {}
    for o in client.as_completed(ids, timeout=3600):
        outcomes[o.id if isinstance(o, JobResult) else o.job_id] = o
    return time.time() - t0, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder (the tiny test model on a CPU)")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--lease", type=int, default=15)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(20.0, 40.0))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="chaos-cpu")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="vqueue-chaos-"))
    server = RedisServer(tmp / "redis", appendonly=True)
    env = {**cpu_engine_env(tmp / "cache"), **tiny_model_env(Path(args.model).resolve(), server.url, MODEL),
           "VQUEUE_REDIS__LEASE_S": str(args.lease), "VQUEUE_WORKER__ENGINE_PING_INTERVAL_S": "1",
           "VQUEUE_WORKER__ENGINE_PING_TIMEOUT_S": str(max(2, args.lease // 3))}  # fmt: skip
    fleet = Fleet(env, tmp)
    client = Client(Settings(redis={"url": server.url, "lease_s": args.lease},
                             worker={"engine_ping_interval_s": 1, "engine_ping_timeout_s": max(2, args.lease // 3)}))
    try:
        for name in ("a", "b"):
            fleet.start(name)
        for w in fleet.workers.values():
            w.wait_ready()
        log("workers ready; phase 1, no faults")
        calm_s, _ = run_phase(client, make_jobs(args.jobs, "calm", args.max_tokens))
        log(f"no faults: {args.jobs} jobs in {calm_s:.1f} s")

        kills: list[dict] = []
        stop = threading.Event()

        def chaos() -> None:
            redis_done = False
            while not stop.wait(rng.uniform(*args.kill_every)):
                if len(kills) == 1 and not redis_done:
                    log("chaos: SIGKILL redis-server, restart in 2 s")
                    server.kill()
                    time.sleep(2)
                    server.start()
                    redis_done = True
                    kills.append({"what": "redis", "at": time.time()})
                    continue
                # A random serving worker, and only while another one serves too: on this CPU an
                # engine takes about a minute to start, longer than the kill interval.
                serving = sorted(n for n, w in fleet.workers.items() if " ready." in w.log_text())
                if len(serving) < 2:
                    continue
                name = rng.choice(serving)
                at = time.time()
                fleet.workers[name].kill()
                log(f"chaos: SIGKILL worker {name}'s process group; starting a new one")
                kills.append({"what": f"worker {name}", "at": at})
                fleet.start(name)

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        chaos_thread.start()
        stormy_s, stormy = run_phase(client, make_jobs(args.jobs, "chaos", args.max_tokens))
        stop.set()
        chaos_thread.join(120)
        log(f"with faults: {args.jobs} jobs in {stormy_s:.1f} s, {len(kills)} faults")

        r = redis.Redis.from_url(server.url)
        ids = list(stormy)
        counters = dict(zip(ids, (int(a or 0) for a in r.mget([keys.attempt_key(i) for i in ids])), strict=True))
        results = {i: o for i, o in stormy.items() if isinstance(o, JobResult)}
        rerun = {i for i, res in results.items() if res.attempt > 1}
        # Each rerun job's record says which worker had it before and when it took it: it must
        # be a worker killed after that (else a live worker's job ran twice).
        worker_kills = [k for k in kills if k["what"].startswith("worker")]
        caught: dict[int, list[float]] = {n: [] for n in range(len(worker_kills))}
        rerun_not_held = 0
        for job_id in rerun:
            attempts = client.job(job_id).attempts
            first, last = attempts[0], attempts[-1]
            killer = next((n for n, k in enumerate(worker_kills) if first.worker.startswith(k["what"][-1] + "@")
                           and first.picked_up_at <= k["at"]), None)  # fmt: skip
            if killer is None:
                rerun_not_held += 1
            else:
                caught[killer].append(last.picked_up_at - worker_kills[killer]["at"])
        for n, k in enumerate(worker_kills):
            k["rerun"] = len(caught[n])
            k["back_after_s"] = round(max(caught[n]), 2) if caught[n] else None
        report = {
            "label": args.label, "device": device(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": versions(), "command": "python -m bench.chaos " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out",)),
            "lease_s": args.lease, "jobs_per_phase": args.jobs, "max_tokens": args.max_tokens,
            "lost": args.jobs - len(stormy), "failed": len(stormy) - len(results),
            "rerun": len(rerun), "rerun_not_held": rerun_not_held,
            "redelivered_not_rerun": sum(1 for i, n in counters.items() if n > 1 and i not in rerun),
            "faults": kills,
            "back_after_s_median": statistics.median([k["back_after_s"] for k in kills if k.get("back_after_s")]
                                                     or [0]),
            "no_faults_s": round(calm_s, 1), "with_faults_s": round(stormy_s, 1),
            "throughput_ratio": round(calm_s / stormy_s, 3),
            "unacked_left": r.zcard(keys.UNACKED_INDEX_KEY),
        }  # fmt: skip
        out = Path(args.out) / f"{args.label}.json"
        out.write_text(json.dumps(report, indent=1))
        log(json.dumps({k: v for k, v in report.items() if k != "faults"}, indent=1))
        log(f"wrote {out}")
    finally:
        fleet.stop()
        client.close()
        server.close()


if __name__ == "__main__":
    main()
