"""No job lost: engine death hands jobs back, SIGTERM finishes them, SIGKILL leaves no engine behind.

These start their own workers on their own model queue, so the session worker is untouched.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
import redis

from devtools.worker_process import WorkerProcess, tiny_model_env
from producer import Client, CompletionJob, Sampling, keys

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-resilience"
LONG = Sampling(max_tokens=400, temperature=0, ignore_eos=True)


@pytest.fixture
def env(worker_env: dict, tiny_model: Path, redis_server) -> dict:
    return {**worker_env, **tiny_model_env(tiny_model, redis_server.url, MODEL)}


def start(env: dict, tmp_path: Path, name: str) -> WorkerProcess:
    worker = WorkerProcess(env, log_path=tmp_path / f"{name}.log", cwd=ROOT, extra_args=("-n", f"{name}@%h"))
    worker.wait_ready()
    return worker


def wait_started(client: Client, ids: list[str], timeout_s: float = 180) -> list[str]:
    """Until no job is still queued; returns their states then (STARTED, or SUCCESS if one was quick)."""
    deadline = time.monotonic() + timeout_s
    while "PENDING" in (states := [client.state(i) for i in ids]):
        assert time.monotonic() < deadline, f"jobs did not start: {states}"
        time.sleep(0.05)
    return states


def engine_processes(worker: WorkerProcess) -> list[psutil.Process]:
    children = psutil.Process(worker.proc.pid).children(recursive=True)
    return [p for p in children if "worker.reaper" not in " ".join(p.cmdline())]


def test_engine_death_requeues_in_flight_jobs_and_exits_nonzero(env, client: Client, tmp_path: Path) -> None:
    # Given a worker with 8 long jobs in its engine
    first = start(env, tmp_path, "first")
    ids = client.submit_many([CompletionJob(model=MODEL, prompt=f"long {i}", sampling=LONG) for i in range(8)])
    try:
        assert wait_started(client, ids) == ["STARTED"] * 8
        # When its engine process dies
        core = [p for p in engine_processes(first) if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
        assert core, f"no EngineCore among {[p.name() for p in engine_processes(first)]}"
        core[0].kill()
        # Then the worker exits with a failure code and hands every job back, failing none
        assert first.proc.wait(120) == os.EX_SOFTWARE
        assert client.queue_length(MODEL) == 8
        assert all(client.state(i) == "STARTED" for i in ids)  # not FAILURE
    finally:
        first.kill()
    # And a fresh worker runs them all, as second attempts
    second = start(env, tmp_path, "second")
    try:
        results = list(client.as_completed(ids, timeout=300))
        assert sorted(r.id for r in results) == sorted(ids)
        assert all(r.attempt == 2 and r.usage.completion_tokens == 400 for r in results)
        assert all(r.worker.startswith("second@") for r in results)

        # SIGTERM is a warm shutdown: jobs in flight finish, the worker exits 0, even when the
        # signal goes to the worker's whole process group (systemd's default, a terminal's Ctrl-C)
        longest = Sampling(max_tokens=900, temperature=0, ignore_eos=True)
        more = client.submit_many([CompletionJob(model=MODEL, prompt=f"term {i}", sampling=longest) for i in range(8)])
        assert "STARTED" in wait_started(client, more)
        assert second.terminate(timeout_s=300, group=True) == 0
        assert [client.state(i) for i in more] == ["SUCCESS"] * 8
        # and none of them was handed back to the queue on the way out (it would run twice)
        r = redis.Redis.from_url(client.settings.redis.url)
        assert r.mget([keys.attempt_key(i) for i in more]) == [b"1"] * 8
        assert client.queue_length(MODEL) == 0 and r.zcard(keys.UNACKED_INDEX_KEY) == 0
    finally:
        second.kill()


def test_sigkilled_worker_leaves_no_engine_processes_and_drops_out_of_models(env, client, tmp_path: Path) -> None:
    worker = start(env, tmp_path, "killed")
    try:
        engine = engine_processes(worker)
        assert engine, "the engine runs in child processes"
        assert any(m.id == MODEL for m in client.models())
        worker.proc.kill()  # the main process only, as the OOM killer would
        worker.proc.wait()
        _, alive = psutil.wait_procs(engine, timeout=15)
        assert not alive, f"engine processes outlived the worker: {[p.pid for p in alive]}"
        # Its announcement expires after three missed heartbeats (1 s each in tests).
        deadline = time.monotonic() + 10
        while any(m.id == MODEL for m in client.models()):
            assert time.monotonic() < deadline, "a dead worker is still listed"
            time.sleep(0.2)
    finally:
        worker.kill()


def test_worker_whose_engine_cannot_start_exits_saying_why(env, tmp_path: Path) -> None:
    broken = {**env, "VQUEUE_MODEL__SOURCE": str(tmp_path / "no-such-model")}
    worker = WorkerProcess(broken, log_path=tmp_path / "broken.log", cwd=ROOT)
    try:
        assert worker.proc.wait(120) != 0  # never "ready" without an engine
        log = worker.log_text()
        assert "the engine did not start" in log and "no-such-model" in log and "model.source" in log
        assert " ready." not in log
    finally:
        worker.kill()


def test_engine_process_death_requeues_in_flight_jobs_and_exits_nonzero(env, client: Client, tmp_path: Path,
                                                                        redis_server) -> None:
    # Given a worker with 4 long jobs in its engine process (worker.engine_process)
    worker = start(env, tmp_path, "front")
    ids = client.submit_many([CompletionJob(model=MODEL, prompt=f"front {i}", sampling=LONG) for i in range(4)])
    try:
        assert wait_started(client, ids) == ["STARTED"] * 4
        # When the engine process itself is killed (say, by the OOM killer)
        engine = engine_processes(worker)
        front = [p for p in engine if "worker.engine_process" in " ".join(p.cmdline())]
        assert len(front) == 1 and len(engine) > 1, [p.cmdline() for p in engine]
        front[0].kill()
        # Then the worker hands every job back, fails none, and exits for its supervisor to restart it
        assert worker.proc.wait(120) == os.EX_SOFTWARE
        assert client.queue_length(MODEL) == 4
        assert all(client.state(i) == "STARTED" for i in ids)
        assert "the engine process ended" in worker.log_text()
        # And vLLM's own processes, orphaned by the engine process's death, are gone with it
        _, alive = psutil.wait_procs(engine, timeout=15)
        assert not alive, f"engine processes outlived the worker: {[p.name() for p in alive]}"
    finally:
        worker.kill()
        redis.Redis.from_url(redis_server.url).delete(keys.queue_for(MODEL))  # nobody will run them
