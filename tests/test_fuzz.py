"""Whatever arrives, the worker keeps serving: raw queue messages and public-API jobs, fuzzed.

Raw messages are pushed straight onto the session worker's queue list, as a buggy producer or
anyone with write access to Redis could. Each must end in a typed failure (when a job id can
be read from it) or a dead-letter entry (when not), the worker must never exit, and good jobs
sent between them must succeed. Also: the producer's hand-built envelope against the one kombu
itself publishes, and every key left in Redis after all that has a TTL.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from producer import Client, CompletionJob, InvalidJob, JobFailed, JobResult, Sampling, keys
from producer.transport import JobPublisher, make_celery
from tests.conftest import MODEL, ROOT

QUEUE = keys.queue_for(MODEL)
#: What a job may end as, besides success: vqueue's typed errors (producer.errors.WIRE_ERRORS).
TYPED = {"InvalidJob", "MalformedMessage", "EngineError"}
# Each example waits on the real worker, so no shrinking (minutes): the failing draw is printed as found.
FUZZ = settings(max_examples=int(os.environ.get("VQUEUE_FUZZ_EXAMPLES", "60")), deadline=None, derandomize=True,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def good_envelope(client: Client, job_id: str) -> dict:
    job = CompletionJob(id=job_id, model=MODEL, prompt="fuzz", sampling=Sampling(max_tokens=2, temperature=0))
    publisher = JobPublisher(client._celery, client._redis)
    return json.loads(publisher.envelope(keys.GENERATE_TASK, job.id, QUEUE, job.model_dump(mode="json"), "fuzz"))


def b64json(value: object) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def set_path(envelope: dict, path: tuple[str, ...], value: object) -> dict:
    out = copy.deepcopy(envelope)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return out


_DELETE = object()
JUNK = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
                 st.just(_DELETE))  # fmt: skip
#: Where in kombu's envelope a mutation goes, and what it puts there.
MUTATIONS = st.one_of(
    st.tuples(st.sampled_from([("body",), ("content-type",), ("properties",), ("headers",),
                               ("properties", "delivery_tag"), ("properties", "delivery_info"),
                               ("properties", "body_encoding"), ("headers", "task"), ("headers", "id")]), JUNK),
    st.tuples(st.just(("body",)), st.one_of(
        st.text(max_size=30),                                              # not base64
        st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()),  # base64, not JSON
        st.builds(b64json, st.one_of(JUNK.filter(lambda v: v is not _DELETE), st.lists(st.integers(), max_size=4))),
        st.builds(lambda job: b64json([[job], {}, {}]), st.dictionaries(          # JSON, a wrong job
            st.sampled_from(["kind", "model", "prompt", "sampling", "messages", "id"]),
            st.one_of(st.text(max_size=10), st.integers(), st.floats(allow_nan=False), st.none(),
                      st.just({"max_tokens": 7.0}), st.just({"max_tokens": "many"}), st.just("x" * 200_000)),
            max_size=5)),
        st.just(b64json([[{"kind": "completion", "model": MODEL, "prompt": "x"}], {"extra": 1}, {}])),
        st.just(b64json([[{"kind": "completion", "model": MODEL, "prompt": "x"}, 2], {}, {}])),
    )),
    st.tuples(st.just(("content-type",)), st.sampled_from(["application/x-python-serialize", "application/x-yaml",
                                                           "text/plain", "application/data"])),
    st.tuples(st.just(("headers", "task")), st.sampled_from(["celery.ping", "vqueue.nope", "tasks.add"])),
)
NOT_ENVELOPES = st.one_of(st.binary(max_size=200), st.text(max_size=50).map(str.encode),
                          st.builds(lambda v: json.dumps(v).encode(), st.one_of(
                              st.lists(st.integers(), max_size=3), st.text(max_size=20), st.none(), st.integers(),
                              st.floats(allow_nan=False), st.booleans())))  # fmt: skip


def wait_outcome(client: Client, r: redis.Redis, job_id: str | None, dead_before: int) -> str:
    """'result:<status>' once the job's result is stored, or 'dead' once a dead letter was added."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if job_id is not None and r.exists(keys.result_key(job_id)):
            return "result"
        if int(r.get(keys.DEAD_LETTERS_TOTAL_KEY) or 0) > dead_before:
            return "dead"
        time.sleep(0.02)
    raise AssertionError(f"message for job {job_id} neither finished nor was dead-lettered in 60 s")


def assert_typed(client: Client, job_id: str) -> None:
    try:
        client.result(job_id, timeout=5)
    except JobFailed as exc:
        assert exc.error_type in TYPED, f"untyped failure: {exc}"


def assert_serving(worker, client: Client) -> None:
    assert worker.proc.poll() is None, worker.log_text()[-3000:]
    ok = client.result(client.submit(CompletionJob(model=MODEL, prompt="alive?", sampling=Sampling(max_tokens=2))),
                       timeout=120)
    assert ok.usage.completion_tokens == 2


def test_no_raw_message_stops_the_worker(worker, client: Client, redis_server) -> None:
    r = redis.Redis.from_url(redis_server.url)
    counts = {"result": 0, "dead": 0}

    @FUZZ
    @given(data=st.data())
    def push_one(data: st.DataObject) -> None:
        dead_before = int(r.get(keys.DEAD_LETTERS_TOTAL_KEY) or 0)
        if data.draw(st.booleans()):
            raw, job_id = data.draw(NOT_ENVELOPES), None
        else:
            job_id = uuid.uuid4().hex
            path, value = data.draw(MUTATIONS)
            envelope = set_path(good_envelope(client, job_id), path, value)
            if path == ("headers",):
                job_id = None  # the mutation took the headers, and the id, away
            elif path == ("headers", "id"):  # replaced: a new id (Celery's task id) or junk
                job_id = value if isinstance(value, str) and 0 < len(value) <= 128 else None
            raw = json.dumps(envelope).encode()
        r.lpush(QUEUE, raw)
        outcome = wait_outcome(client, r, job_id, dead_before)
        counts[outcome] += 1
        if outcome == "result":
            assert_typed(client, job_id)
        assert worker.proc.poll() is None, f"the worker exited on {raw[:200]!r}"

    push_one()
    assert counts["result"] and counts["dead"], counts  # both paths were exercised
    assert_serving(worker, client)
    # The operators' view: the dead letters are listed by `vqueue dead`, with their reason
    listed = subprocess.run([str(sys.executable).replace("python", "vqueue"), "dead", "--json", "--limit", "5"],
                            env={**os.environ, "VQUEUE_REDIS__URL": redis_server.url}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert len(entries) == 5 and all(e["reason"] and e["raw_size"] >= 0 and e["queue"] == QUEUE for e in entries)


def test_the_worker_survives_each_kind_of_unreadable_message_and_fails_its_job(worker, client, redis_server) -> None:
    """The cases seen to kill or silently drop before: named, one by one (the fuzz's seeds)."""
    r = redis.Redis.from_url(redis_server.url)
    for raw in [b"not json", b"\xff\xfe\x00garbage", b"[1, 2]", b'"a string"', b"null", b"42"]:
        before = int(r.get(keys.DEAD_LETTERS_TOTAL_KEY) or 0)
        r.lpush(QUEUE, raw)
        assert wait_outcome(client, r, None, before) == "dead"
        entry = client.dead_letters(1)[0]
        assert base64.b64decode(entry.raw_b64) == raw and entry.error_type == "MalformedMessage"
    cases = {("properties",): "properties", ("body",): "body", ("headers", "task"): "headers.task",
             ("content-type",): "content-type"}  # fmt: skip
    for path, field in cases.items():
        job_id = uuid.uuid4().hex
        r.lpush(QUEUE, json.dumps(set_path(good_envelope(client, job_id), path, "junk")))
        with pytest.raises(JobFailed) as info:
            client.result(job_id, timeout=60)
        assert info.value.field == field and info.value.error_type in TYPED and not info.value.retryable
    assert_serving(worker, client)


ODD_TEXT = st.text(alphabet=st.characters(codec=None, categories=None), max_size=40)  # surrogates included
NUMBERISH = st.one_of(st.integers(-3, 8), st.floats(-1, 8), st.text(max_size=3), st.none(), st.booleans())


@FUZZ
@given(prompt=st.one_of(ODD_TEXT, st.just("x" * 300_000), st.lists(st.integers(-1, 200_000), max_size=5)),
       max_tokens=NUMBERISH, temperature=NUMBERISH, n=NUMBERISH,
       stop=st.one_of(ODD_TEXT, st.lists(ODD_TEXT, max_size=2)))
def test_public_api_jobs_end_typed_or_are_refused_at_submit(worker, client: Client, prompt, max_tokens, temperature,
                                                           n, stop) -> None:
    fields = {"max_tokens": max_tokens, "temperature": temperature, "n": n, "stop": stop}
    try:
        job = CompletionJob(model=MODEL, prompt=prompt, sampling={k: v for k, v in fields.items() if v is not None})
        if job.sampling.max_tokens is None or job.sampling.max_tokens > 8:
            job = job.model_copy(update={"sampling": job.sampling.model_copy(update={"max_tokens": 4})})
        job_id = client.submit(job)
    except (ValidationError, InvalidJob):
        return  # refused at submit, naming the field: fine
    try:
        outcome = client.result(job_id, timeout=120)
    except JobFailed as exc:
        assert exc.error_type in TYPED, f"untyped failure: {exc}"
    else:
        assert isinstance(outcome, JobResult) and outcome.usage.completion_tokens >= 1
    assert worker.proc.poll() is None


def test_envelope_matches_the_one_kombu_publishes(redis_server) -> None:
    """The producer's fast path writes kombu's Redis envelope itself; kombu's own must look the same."""
    from producer.settings import Settings

    s = Settings(redis={"url": redis_server.url})
    app = make_celery(s, results=False)
    r = redis.Redis.from_url(redis_server.url)
    queue = "vqueue.contract-check"
    payload = {"kind": "completion", "model": "contract-check", "prompt": "x"}
    app.send_task(keys.GENERATE_TASK, args=[payload], task_id="contract-1", queue=queue, argsrepr="x")
    theirs = json.loads(r.rpop(queue))
    ours = json.loads(JobPublisher(app, r).envelope(keys.GENERATE_TASK, "contract-1", queue, payload, "x"))
    assert set(ours) == set(theirs)
    assert set(ours["headers"]) == set(theirs["headers"])
    # send_task also copies its argsrepr option into the properties; no reader uses it there.
    assert set(ours["properties"]) == set(theirs["properties"]) - {"argsrepr"}
    assert ours["properties"]["delivery_info"] == theirs["properties"]["delivery_info"]
    for key in ("content-type", "content-encoding"):
        assert ours[key] == theirs[key]
    assert ours["properties"]["body_encoding"] == theirs["properties"]["body_encoding"]
    decode = lambda e: json.loads(base64.b64decode(e["body"]))  # noqa: E731
    assert decode(ours) == decode(theirs)
    volatile = {"delivery_tag", "correlation_id", "reply_to", "argsrepr"}
    assert {k: v for k, v in ours["properties"].items() if k not in volatile} == \
        {k: v for k, v in theirs["properties"].items() if k not in volatile}
    # ignore_result: send_task leaves None ("the task's own setting"), we say False; both mean store it.
    assert not ours["headers"]["ignore_result"] and not theirs["headers"]["ignore_result"]
    skip = {"origin", "eta", "expires", "retries", "timelimit", "ignore_result"}
    assert {k: v for k, v in ours["headers"].items() if k not in skip} == \
        {k: v for k, v in theirs["headers"].items() if k not in skip}
    app.close()


def test_every_key_left_in_redis_has_a_ttl_and_nothing_is_leased(worker, client: Client, redis_server) -> None:
    """Runs after the rest of this module (file order): the footprint of a mixed run."""
    ids = client.submit_many([CompletionJob(model=MODEL, prompt=f"tail {i}", sampling=Sampling(max_tokens=3))
                              for i in range(8)])  # fmt: skip
    list(client.as_completed(ids, timeout=120))
    r = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 30
    while r.zcard(keys.UNACKED_INDEX_KEY) or r.hlen(keys.UNACKED_KEY):
        assert time.monotonic() < deadline, "jobs stayed leased after they finished"
        time.sleep(0.1)
    # kombu's queue bindings (one small set per queue) and vqueue's list of the models that ever
    # had a queue (one small set, what the backlog metrics read) are the only keys meant to live
    # forever; queues exist only while they hold jobs, and this worker's queue is empty now.
    forever = [k.decode() for k in r.scan_iter(count=1000)
               if r.ttl(k) == -1 and not k.startswith(b"_kombu.binding") and k != keys.MODELS_KEY.encode()
               and r.type(k) != b"list"]  # fmt: skip
    assert forever == []
    assert r.llen(QUEUE) == 0
