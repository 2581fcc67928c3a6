"""The main job, end to end on one machine: a local redis-server, one ``celery -A worker worker``,
a completion and a chat job enqueued from Python, their results and usage printed.

    python -m devtools.demo [--tiny]

The worker serves ``model.source`` from the settings when it is a local folder, or when
ModelScope can be reached; otherwise (or with ``--tiny``) it builds a tiny random-weight
Qwen2-VL model offline and says so: its answers are gibberish, the plumbing is real.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from devtools.redis_server import RedisServer
from devtools.worker_process import WorkerProcess, cpu_engine_env, tiny_model_env
from producer import ChatJob, Client, CompletionJob, JobResult, Sampling, Settings, get_settings

console = Console()
ROOT = Path(__file__).resolve().parent.parent
TINY_DIR = ROOT / ".models" / "tiny-qwen2-vl"


def hub_reachable(host: str = "www.modelscope.cn", timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def show(title: str, result: JobResult) -> None:
    u, t = result.usage, result.timings
    console.rule(title)
    console.print(result.text, markup=False, highlight=False)
    console.print(
        f"[dim]finish_reason={result.finish_reason.value}  usage: prompt {u.prompt_tokens} + completion "
        f"{u.completion_tokens} = {u.total_tokens} tokens  queue wait {t.started_at - t.enqueued_at:.3f} s  "
        f"run {t.finished_at - t.started_at:.3f} s  worker {result.worker}[/dim]"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="serve the tiny random model even if a hub is reachable")
    args = parser.parse_args()

    settings = get_settings()
    work = Path(tempfile.mkdtemp(prefix="vqueue-demo-"))
    env = cpu_engine_env(work / "cache") if not has_gpu() else {}
    use_tiny = args.tiny or not (Path(settings.model.source).is_dir() or hub_reachable())
    if use_tiny:
        console.print("[yellow]No model hub reachable (or --tiny): building a tiny random-weight Qwen2-VL model "
                      f"in {TINY_DIR}. Its answers are gibberish; everything else is the real path.[/yellow]")
        from devtools.tiny_model import ensure_tiny_model

        ensure_tiny_model(TINY_DIR)
    with RedisServer(work / "redis") as redis_server:
        if use_tiny:
            env.update(tiny_model_env(TINY_DIR, redis_server.url, served_name=settings.model.served_name))
        else:
            env["VQUEUE_REDIS__URL"] = redis_server.url
        console.print(f"redis-server on {redis_server.url}; starting `celery -A worker worker` "
                      f"(log: {work / 'worker.log'}); the engine takes a minute to start...")
        started = time.monotonic()
        with WorkerProcess(env, log_path=work / "worker.log", cwd=ROOT) as worker:
            worker.wait_ready()
            console.print(f"worker ready in {time.monotonic() - started:.0f} s")
            model = settings.model.served_name
            with Client(Settings(redis={"url": redis_server.url})) as client:
                completion_id = client.submit(CompletionJob(
                    model=model, prompt="你好，你是谁", sampling=Sampling(max_tokens=64, temperature=0)))
                chat_id = client.submit(ChatJob(model=model, messages=[
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Name three uses of a job queue."},
                ], sampling=Sampling(max_tokens=64, temperature=0)))
                show(f"completion {completion_id}", client.result(completion_id, timeout=300))
                show(f"chat {chat_id}", client.result(chat_id, timeout=300))
            code = worker.terminate()
        console.print(f"worker stopped (exit code {code}); redis-server stopped. Logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
