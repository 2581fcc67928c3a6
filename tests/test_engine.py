"""The worker's engine holder on its own, without Celery: every job it is handed enters the one
engine at once, so vLLM's scheduler runs them all in the same steps (continuous batching)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from producer import CompletionJob, Sampling, Settings
from worker.engine import EngineHolder

N_JOBS = 64  # the tiny model's max_num_seqs


@pytest.fixture
def holder(worker_env: dict, monkeypatch: pytest.MonkeyPatch):
    for name, value in worker_env.items():  # the session worker's settings and vLLM's CPU environment
        monkeypatch.setenv(name, value)
    holder = EngineHolder(Settings())
    holder.start()
    try:
        yield holder
    finally:
        holder.stop()


def test_every_job_handed_over_runs_in_the_same_engine_steps(holder: EngineHolder) -> None:
    model = holder.settings.model.served_name
    jobs = [CompletionJob(model=model, prompt=f"job {i}", sampling=Sampling(max_tokens=256, temperature=0,
                                                                           ignore_eos=True)) for i in range(N_JOBS)]

    def run(job: CompletionJob):
        return holder.run_job(job, started_at=time.time(), worker="test", attempt=1)

    with ThreadPoolExecutor(N_JOBS) as pool:
        results = list(pool.map(run, jobs))
    assert [r.id for r in results] == [j.id for j in jobs]
    assert all(r.usage.completion_tokens == 256 and r.attempt == 1 for r in results)
    # Every job had its first token before any job finished: all were decoding together.
    first_finish = min(r.timings.finished_at for r in results)
    assert max(r.timings.first_token_at for r in results) < first_finish
