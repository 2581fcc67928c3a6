"""What operators run: compose.yaml's commands, Flower's view of the jobs, the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from devtools.redis_server import free_port
from producer import CompletionJob, Sampling
from tests.conftest import MODEL, ROOT

WORKER_CMD = ["celery", "-A", "worker", "worker"]


def test_compose_runs_the_commands_the_readme_and_tests_use() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    readme = (ROOT / "README.md").read_text()
    assert compose["worker"]["command"] == WORKER_CMD
    assert " ".join(WORKER_CMD) in readme
    assert compose["flower"]["command"][:4] == ["celery", "-A", "worker", "flower"]
    assert "celery -A worker flower" in readme
    redis_cmd = compose["redis"]["command"]
    assert "--appendonly" in redis_cmd and redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert compose["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # The tests start the worker with the same command (plus logging flags only).
    assert '"-A", "worker", "worker"' in (ROOT / "devtools" / "worker_process.py").read_text()


def test_readme_gives_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "scripts/demo.sh" in readme and "scripts/test.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_flower_shows_the_worker_and_each_job_with_trimmed_arguments(worker, client, redis_server, tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "VQUEUE_REDIS__URL": redis_server.url, "FLOWER_UNAUTHENTICATED_API": "true"}
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115
    flower = subprocess.Popen([str(Path(sys.executable).with_name("celery")), "-A", "worker", "flower",
                               f"--port={port}", "--address=127.0.0.1"], env=env, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/workers", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
                time.sleep(0.5)
        time.sleep(2)  # Flower subscribes to the event stream
        job = CompletionJob(model=MODEL, prompt="word " * 500, sampling=Sampling(max_tokens=4, temperature=0))
        client.result(client.submit(job), timeout=60)
        deadline = time.monotonic() + 30
        while True:
            tasks = json.load(urllib.request.urlopen(f"{base}/api/tasks", timeout=5))
            task = tasks.get(job.id)
            if task and task.get("state") == "SUCCESS":
                break
            assert time.monotonic() < deadline, f"Flower never saw {job.id} succeed: {task}"
            time.sleep(0.5)
        assert task["name"] == "vqueue.generate"
        assert task["worker"].startswith("celery@")
        assert "completion" in task["args"] and len(task["args"]) < 400  # not the 2,500-character prompt
    finally:
        flower.terminate()
        flower.wait(10)
        log.close()


def test_cli_complete_chat_and_result(worker, redis_server) -> None:
    env = {**os.environ, "VQUEUE_REDIS__URL": redis_server.url, "VQUEUE_MODEL__SERVED_NAME": MODEL, "COLUMNS": "200"}
    vqueue = str(Path(sys.executable).with_name("vqueue"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([vqueue, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)

    done = run("complete", "你好，你是谁", "--max-tokens", "8", "--temperature", "0", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["completion_tokens"] == 8

    chat = run("chat", "--system", "Be brief.", "What is a queue?", "--max-tokens", "4", "--temperature", "0")
    assert chat.returncode == 0, chat.stderr
    assert re.search(r"prompt \d+ \+ completion 4 = \d+ tokens", chat.stderr), chat.stderr

    job_id = run("complete", "later", "--max-tokens", "3", "--no-wait").stdout.strip()
    later = run("result", job_id, "--json")
    assert later.returncode == 0 and json.loads(later.stdout)["id"] == job_id

    bad = run("complete", "x", "--max-tokens", "0")
    assert bad.returncode == 2 and "max_tokens" in bad.stderr
