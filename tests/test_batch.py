"""Batch files through ``vqueue batch run`` (the real CLI, a subprocess) against the real worker:
OpenAI's batch format in and out, bad lines in the error file, exactly once across a SIGKILL,
cancel, the completion window."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from producer import Client, keys
from producer.batch import batch_id_for, fingerprint
from tests.conftest import MODEL, ROOT


def completion_line(custom_id: str, max_tokens: int = 8, **body: Any) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": f"Tell me about {custom_id}", "max_tokens": max_tokens,
                     "temperature": 0, "ignore_eos": True, **body}}


def chat_line(custom_id: str, max_tokens: int = 8) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Hi {custom_id}"}],
                     "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}


def write_jsonl(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def vqueue(redis_url: str, *args: str, **popen: Any) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VQUEUE_")}, "VQUEUE_REDIS__URL": redis_url}
    return subprocess.Popen([sys.executable, "-m", "producer.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run_batch(redis_url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = vqueue(redis_url, "batch", "run", "--quiet", *args)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(what: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def custom_ids(*files: Path) -> list[str]:
    return sorted(line["custom_id"] for f in files for line in read_jsonl(f))


def test_a_batch_writes_every_line_once_and_bad_lines_name_line_and_field(worker, redis_server, client: Client,
                                                                         tmp_path: Path) -> None:
    good = [completion_line(f"c{i}") if i % 2 else chat_line(f"c{i}") for i in range(12)]
    bad = {
        "not json {": ("invalid_json_line", None),
        json.dumps({"custom_id": "b-url", "method": "POST", "url": "/v1/embeddings", "body": {}}): ("invalid_url",
                                                                                                   "url"),
        json.dumps(completion_line("b-temp", temperature=-1)): ("invalid_request", "body.temperature"),
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}): ("invalid_request", "custom_id"),
        json.dumps(completion_line("b-param", colour="red")): ("invalid_request", "body.colour"),
    }
    lines: list[dict | str] = [*good[:6], *bad, *good[6:]]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out, errs = tmp_path / "out.jsonl", tmp_path / "errs.jsonl"

    done = run_batch(redis_server.url, str(src), "-o", str(out), "--errors", str(errs))
    assert done.returncode == 0, done.stderr

    # Every good line answered once, in OpenAI's batch output format with vLLM's bodies
    answered = read_jsonl(out)
    assert sorted(a["custom_id"] for a in answered) == sorted(g["custom_id"] for g in good)
    for a in answered:
        assert a["error"] is None and a["response"]["status_code"] == 200
        body = a["response"]["body"]
        chat = int(a["custom_id"][1:]) % 2 == 0
        assert body["object"] == ("chat.completion" if chat else "text_completion")
        assert body["usage"]["completion_tokens"] == 8
        text = body["choices"][0]["message"]["content"] if chat else body["choices"][0]["text"]
        assert text
    # Each bad line in the error file, naming its line (1-based) and the field at fault
    failed = read_jsonl(errs)
    assert len(failed) == len(bad)
    by_line = {f["error"]["line"]: f for f in failed}
    for n, (code, param) in enumerate(bad.values(), start=7):
        assert by_line[n]["response"] is None
        assert (by_line[n]["error"]["code"], by_line[n]["error"]["param"]) == (code, param)
        assert by_line[n]["error"]["message"].startswith(f"line {n}: ")
    # The lines ran at the batch priority, below interactive jobs
    batch_id = batch_id_for(fingerprint(src)[0])
    assert {client.job(keys.batch_job_id(batch_id, i)).priority for i in (0, 11)} == \
        {client.settings.queue.batch_priority}
    status = json.loads(vqueue(redis_server.url, "batch", "status", batch_id).communicate(timeout=60)[0])
    assert (status["status"], status["completed"], status["failed"]) == ("completed", "12", "5")

    # Run again: nothing runs again, nothing is written twice
    again = run_batch(redis_server.url, str(src), "-o", str(out), "--errors", str(errs))
    assert again.returncode == 0, again.stderr
    assert len(read_jsonl(out)) == 12 and len(read_jsonl(errs)) == 5


def attempts(r: redis.Redis, job_ids: list[str]) -> list[int]:
    return [int(a or 0) for a in r.mget([keys.attempt_key(j) for j in job_ids])]


def test_a_batch_killed_mid_run_and_run_again_writes_each_line_exactly_once(worker, redis_server,
                                                                           tmp_path: Path) -> None:
    n = 60  # lengths spread out, so that lines finish one after another over several seconds
    src = write_jsonl(tmp_path / "in.jsonl", [completion_line(f"k{i}", max_tokens=20 + 10 * i) for i in range(n)])
    out, errs = tmp_path / "out.jsonl", tmp_path / "errs.jsonl"
    args = (str(src), "-o", str(out), "--errors", str(errs))
    first = vqueue(redis_server.url, "batch", "run", "--quiet", *args)
    try:
        wait_for(lambda: len(read_jsonl(out)) >= 3)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    written_before = len(read_jsonl(out))
    assert written_before < n, "the batch ended before it was killed; the test proves nothing"

    again = run_batch(redis_server.url, *args)
    assert again.returncode == 0, again.stderr
    assert custom_ids(out, errs) == sorted(f"k{i}" for i in range(n))
    assert read_jsonl(errs) == []
    batch_id = batch_id_for(fingerprint(src)[0])
    # No line was submitted twice: every job ran exactly once
    r = redis.Redis.from_url(redis_server.url)
    assert attempts(r, [keys.batch_job_id(batch_id, i) for i in range(n)]) == [1] * n


def test_a_cancelled_batch_keeps_what_finished_and_its_jobs_stop(worker, redis_server, client: Client,
                                                                 tmp_path: Path) -> None:
    # Over three times the worker's 64 slots, each job 1000 tokens: the last lines cannot start before
    # three full waves end, long after the cancel (a CLI starting up, seconds on a loaded machine).
    # With 30 lines, all ran at once and finished before the cancel CLI was up.
    n = 200
    src = write_jsonl(tmp_path / "in.jsonl", [completion_line(f"x{i}", max_tokens=1000) for i in range(n)])
    out, errs = tmp_path / "out.jsonl", tmp_path / "errs.jsonl"
    batch_id = batch_id_for(fingerprint(src)[0])
    runner = vqueue(redis_server.url, "batch", "run", "--quiet", str(src), "-o", str(out), "--errors", str(errs),
                    "--window", "1h")
    try:
        wait_for(lambda: client.state(keys.batch_job_id(batch_id, 0)) == "STARTED")
        said = vqueue(redis_server.url, "batch", "cancel", batch_id).communicate(timeout=60)[1]
        assert "cancelling" in said, (said, client.redis.hgetall(keys.batch_key(batch_id)), runner.poll(),
                                      len(read_jsonl(out)), len(read_jsonl(errs)))
        ran = runner.communicate(timeout=120)
    finally:
        runner.kill()
    assert runner.returncode == 0, ran[1][-3000:]
    status = json.loads(vqueue(redis_server.url, "batch", "status", batch_id).communicate(timeout=60)[0])
    assert status["status"] == "cancelled"
    assert custom_ids(out, errs) == sorted(f"x{i}" for i in range(n))
    # What finished is kept; every other line ends cancelled: never run, or stopped with its partial output
    errors = read_jsonl(errs)
    assert len(errors) > 0 and len(read_jsonl(out)) + len(errors) == n
    assert all((e["response"] is None and e["error"]["code"] == "batch_cancelled")
               or (e["response"]["status_code"] == 410 and e["error"]["error"]["type"] == "CancelledError")
               for e in errors), errors[:3]
    # The engine stops running them: no job of the batch is left running
    wait_for(lambda: all(client.job(keys.batch_job_id(batch_id, i)).state != "running" for i in range(n)), 30)


def test_lines_not_done_in_the_completion_window_end_expired(redis_server, client: Client, tmp_path: Path) -> None:
    # A model nobody serves: its lines wait in the queue until the window ends
    lines = [completion_line(f"w{i}") for i in range(5)]
    for line in lines:
        line["body"]["model"] = "tiny-batch-unserved"
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out, errs = tmp_path / "out.jsonl", tmp_path / "errs.jsonl"
    done = run_batch(redis_server.url, str(src), "-o", str(out), "--errors", str(errs), "--window", "1s")
    assert done.returncode == 0, done.stderr
    assert read_jsonl(out) == []
    expired = read_jsonl(errs)
    assert sorted(e["custom_id"] for e in expired) == [f"w{i}" for i in range(5)]
    assert {e["error"]["code"] for e in expired} == {"batch_expired"}
    batch_id = batch_id_for(fingerprint(src)[0])
    r = redis.Redis.from_url(redis_server.url)
    assert r.hget(keys.batch_key(batch_id), "status") == b"expired"
    # None of them is left waiting in the queue to run later: each is cancelled in Redis
    assert {client.state(keys.batch_job_id(batch_id, i)) for i in range(5)} == {"REVOKED"}


def test_the_same_file_is_the_same_batch_and_a_running_batch_has_one_runner(redis_server, tmp_path: Path) -> None:
    from producer.batch import Lease

    src = write_jsonl(tmp_path / "in.jsonl", [completion_line("a"), "", completion_line("b")])
    digest, lines = fingerprint(src)
    assert lines == 2  # the blank line is no request
    assert batch_id_for(digest) == batch_id_for(fingerprint(write_jsonl(tmp_path / "copy.jsonl", [
        completion_line("a"), "", completion_line("b")]))[0])
    r = redis.Redis.from_url(redis_server.url)
    held = Lease(r, "batch_lease_test", 30)
    assert held.take()
    busy = run_batch(redis_server.url, str(src), "-o", str(tmp_path / "o.jsonl"), "--batch-id", "batch_lease_test")
    assert busy.returncode == 3 and held.owner in busy.stderr
    held.release()
    # Output files holding another batch's answers are refused, untouched
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "vqueue-batch_other-0", "custom_id": "x", "response": null, "error": null}\n')
    refused = run_batch(redis_server.url, str(src), "-o", str(other))
    assert refused.returncode == 2 and "another batch" in refused.stderr and "batch_other-0" in refused.stderr
    assert other.read_text().count("\n") == 1
    # A holder on this host whose process is gone is taken over at once (a CLI killed a moment ago)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = Lease(r, "batch_lease_test", 30, owner=f"{os.uname().nodename}:{gone.pid}:x")
    assert dead.take()
    assert Lease(r, "batch_lease_test", 30).take()
