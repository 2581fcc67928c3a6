"""Redis memory and AOF bytes per queued job, measured with a real redis-server.

    python -m bench.redis_memory [--jobs 10000] [--label redis-memory]

For each kind of job, a fresh ``redis-server`` (AOF on, as compose runs it), ``INFO memory``'s
``used_memory`` before and after ``Client.submit_many`` of ``--jobs`` jobs to a model no worker
serves (so they stay queued), the AOF's size after the writes and after ``BGREWRITEAOF``.
Everything a queued job costs is counted: its Celery message in the priority list, its record
hash (``vqueue:job:<id>``) and its image blobs (``vqueue:blob:<id>:<n>``, raw bytes). Results
are not: a finished job's result is written when it ends and kept ``redis.result_ttl_s``.
Writes ``bench/results/<label>.json``; prints one line per kind.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import random
import subprocess
import time
from pathlib import Path

import redis
from PIL import Image

from devtools.redis_server import RedisServer
from producer import ChatJob, Client, CompletionJob, Sampling, Settings

RESULTS = Path(__file__).parent / "results"
UNSERVED = "bench-unserved"


def _png(width: int, height: int, seed: int) -> str:
    """A random-pixel PNG (incompressible, as photos nearly are) as a data: URI."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _text(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ["queue", "worker", "engine", "token", "prompt", "result", "redis", "batch"]
    out = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(words))
    return " ".join(out)[:chars]


def _jobs(kind: str, n: int) -> tuple[list[CompletionJob | ChatJob], dict]:
    sampling = Sampling(max_tokens=256, temperature=0)
    if kind.startswith("completion-"):
        chars = int(kind.split("-")[1])
        return [CompletionJob(model=UNSERVED, prompt=_text(chars, i), sampling=sampling) for i in range(n)], \
            {"prompt_chars": chars}
    if kind.startswith("chat-image-"):
        side = int(kind.split("-")[2])
        uri = _png(side, side, 0)  # one image, sent by every job: each job still gets its own blob
        image_bytes = len(base64.b64decode(uri.split(",", 1)[1]))
        jobs = [ChatJob(model=UNSERVED, sampling=sampling, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}},
            {"type": "text", "text": _text(200, i)}]}]) for i in range(n)]  # fmt: skip
        return jobs, {"image_px": f"{side}x{side}", "image_bytes": image_bytes, "prompt_chars": 200}
    raise ValueError(kind)


def _aof_bytes(server: RedisServer, r: redis.Redis) -> int:
    folder = server.dir / r.config_get("appenddirname")["appenddirname"]
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".aof", ".rdb"))


def _wait_rewrite(r: redis.Redis) -> None:
    while True:
        info = r.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        time.sleep(0.05)


def measure(kind: str, n: int) -> dict:
    jobs, shape = _jobs(kind, n)
    with RedisServer(appendonly=True) as server:
        r = redis.Redis.from_url(server.url)
        with Client(Settings(redis={"url": server.url})) as client:
            client.submit(CompletionJob(model=UNSERVED, prompt="warm-up"))  # kombu's bindings, the pools
            r.bgrewriteaof()
            _wait_rewrite(r)
            before, aof_before, keys_before = r.info("memory")["used_memory"], _aof_bytes(server, r), r.dbsize()
            started = time.perf_counter()
            for start in range(0, n, 1000):
                client.submit_many(jobs[start:start + 1000])
            submit_s = time.perf_counter() - started
            time.sleep(1.2)  # appendfsync everysec
            after, aof_after, keys_after = r.info("memory")["used_memory"], _aof_bytes(server, r), r.dbsize()
            assert client.queue_length(UNSERVED) == n + 1
            r.bgrewriteaof()
            _wait_rewrite(r)
            aof_rewritten = _aof_bytes(server, r)
    return {"kind": kind, **shape, "jobs": n, "memory_bytes_per_job": round((after - before) / n),
            "keys_per_job": (keys_after - keys_before) / n, "aof_bytes_per_job": round((aof_after - aof_before) / n),
            "aof_bytes_per_job_after_rewrite": round(aof_rewritten / (n + 1)),
            "submit_jobs_per_s": round(n / submit_s)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--label", default="redis-memory")
    args = parser.parse_args()
    # (kind, jobs): the large image's 10,000 copies would be 2 GB; 1,000 measure it as well.
    plan = [("completion-100", args.jobs), ("completion-2000", args.jobs), ("chat-image-64", args.jobs),
            ("chat-image-448", max(1, args.jobs // 10))]  # fmt: skip
    rows = []
    for kind, n in plan:
        row = measure(kind, n)
        rows.append(row)
        print(json.dumps(row), flush=True)
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    out = {"command": f"python -m bench.redis_memory --jobs {args.jobs} --label {args.label}", "redis": version,
           "machine": platform.platform(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.label}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / (args.label + '.json')}")


if __name__ == "__main__":
    main()
