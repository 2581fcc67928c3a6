"""OpenAI's Files and Batches API through ``vqueue gateway`` (a subprocess), driven by the real
``openai`` client, against the session's Redis and real worker: output and error files, the
counts, exactly once across a gateway killed mid-batch, cancel, listing and deleting."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import redis
from openai.types import Batch

from devtools.redis_server import RedisServer
from producer import keys
from tests.conftest import MODEL
from tests.test_gateway import GatewayProcess, start_gateway

FINAL = ("completed", "failed", "expired", "cancelled")


def completion_line(custom_id: str, max_tokens: int = 4) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": f"Tell me about {custom_id}", "max_tokens": max_tokens,
                     "temperature": 0, "ignore_eos": True}}


def jsonl(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def client_of(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(api_key="EMPTY", base_url=gateway.base + "/v1", max_retries=0, timeout=60)


def lines_of(oai: openai.OpenAI, file_id: str | None) -> list[dict]:
    assert file_id is not None
    return [json.loads(line) for line in oai.files.content(file_id).text.splitlines()]


def wait_batch(oai: openai.OpenAI, batch_id: str, until: Callable[[Batch], bool], timeout_s: float = 90,
               seen: list[str] | None = None) -> Batch:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = oai.batches.retrieve(batch_id)
        if seen is not None and (not seen or seen[-1] != batch.status):
            seen.append(batch.status)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status} {batch.request_counts}"
        time.sleep(0.2)


def submit(oai: openai.OpenAI, path: Path, window: str = "24h", **create: object) -> Batch:
    uploaded = oai.files.create(file=path.open("rb"), purpose="batch")
    return oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window=window,
                              **create)  # type: ignore[arg-type]


def attempts(r: redis.Redis, batch_id: str, n: int) -> list[int]:
    return [int(a or 0) for a in r.mget([keys.attempt_key(keys.batch_job_id(batch_id, i)) for i in range(n)])]


@pytest.fixture(scope="module")
def files_gateway(worker, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("batches-gateway")
    # A small window: the tiny model answers a whole batch in a second, and "mid-batch" must exist.
    proc = start_gateway(redis_server.url, tmp, files__dir=str(tmp / "files"), files__max_bytes="200000",
                         batch__window="4")
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture
def oai(files_gateway: GatewayProcess) -> openai.OpenAI:
    return client_of(files_gateway)


def test_a_batch_answers_every_line_once_in_output_or_error_file(oai: openai.OpenAI, tmp_path: Path) -> None:
    good = [completion_line(f"g{i}") for i in range(80)]
    chat = {"custom_id": "bad-url", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}}
    bad_temp = completion_line("bad-temp")
    bad_temp["body"]["temperature"] = -1
    unknown = completion_line("bad-param")
    unknown["body"]["colour"] = "red"
    lines: list[dict | str] = [*good[:40], chat, "not json {", bad_temp, unknown, *good[40:]]
    created = submit(oai, jsonl(tmp_path / "in.jsonl", lines), metadata={"run": "t1"})
    assert (created.status, created.endpoint, created.metadata) == ("validating", "/v1/completions", {"run": "t1"})
    assert created.id.startswith("batch_") and created.expires_at == created.created_at + 86400

    seen: list[str] = []
    done = wait_batch(oai, created.id, lambda b: b.status in FINAL, seen=seen)

    assert done.status == "completed"
    assert seen[-2:] == ["in_progress", "completed"] and set(seen) <= {"validating", "in_progress", "completed"}
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 84, "completed": 80, "failed": 4}
    assert done.created_at <= done.in_progress_at <= done.completed_at  # type: ignore[operator]
    out, errs = lines_of(oai, done.output_file_id), lines_of(oai, done.error_file_id)
    # Every line answered exactly once, across both files
    assert sorted(str(x["custom_id"]) for x in out + errs) == sorted([*(g["custom_id"] for g in good), "bad-url",
                                                                     "None", "bad-temp", "bad-param"])
    assert {x["response"]["status_code"] for x in out} == {200}
    assert {x["response"]["body"]["usage"]["completion_tokens"] for x in out} == {4}
    assert all(x["response"]["body"]["choices"][0]["text"] for x in out)
    by_id = {x["custom_id"]: x["error"] for x in errs}
    assert (by_id["bad-url"]["code"], by_id["bad-url"]["param"]) == ("invalid_url", "url")
    assert "differs from the batch's endpoint" in by_id["bad-url"]["message"]
    assert by_id[None]["code"] == "invalid_json_line"
    assert (by_id["bad-temp"]["param"], by_id["bad-param"]["param"]) == ("body.temperature", "body.colour")
    # The output files are Files of their own
    meta = oai.files.retrieve(done.output_file_id)  # type: ignore[arg-type]
    assert (meta.purpose, meta.bytes) == ("batch_output", len(oai.files.content(meta.id).content))


def test_a_gateway_killed_mid_batch_is_replaced_and_each_line_runs_once(worker, redis_server: RedisServer,
                                                                      tmp_path: Path) -> None:
    n = 60
    shared = {"files__dir": str(tmp_path / "files"), "batch__window": "2"}
    first = start_gateway(redis_server.url, tmp_path, **shared)
    try:
        oai = client_of(first)
        batch = submit(oai, jsonl(tmp_path / "in.jsonl", [completion_line(f"k{i}", 32) for i in range(n)]))
        running = wait_batch(oai, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 3)
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        first.close()
    assert running.request_counts is not None and running.request_counts.completed < n, "ended before the kill"
    owner = redis.Redis.from_url(redis_server.url).get(keys.batch_owner_key(batch.id))
    assert owner is not None and owner.decode().split(":")[1] == str(first.proc.pid)  # the dead one held it

    second = start_gateway(redis_server.url, tmp_path, **shared)
    try:
        oai = client_of(second)
        done = wait_batch(oai, batch.id, lambda b: b.status in FINAL)
        assert done.status == "completed"
        assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (n, 0)
        assert done.error_file_id is None
        out = lines_of(oai, done.output_file_id)
    finally:
        second.close()
    assert sorted(x["custom_id"] for x in out) == sorted(f"k{i}" for i in range(n))
    # No job ran twice: the new gateway collected the jobs the dead one had in flight
    assert attempts(redis.Redis.from_url(redis_server.url), batch.id, n) == [1] * n


def test_a_cancelled_batch_keeps_what_finished_and_the_rest_never_runs(oai: openai.OpenAI, redis_server: RedisServer,
                                                                       tmp_path: Path) -> None:
    n = 40
    batch = submit(oai, jsonl(tmp_path / "in.jsonl", [completion_line(f"x{i}", 32) for i in range(n)]))
    wait_batch(oai, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 2)

    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    done = wait_batch(oai, batch.id, lambda b: b.status in FINAL, timeout_s=60)

    assert done.status == "cancelled" and done.cancelled_at is not None
    assert done.request_counts is not None and 2 <= done.request_counts.completed < n
    out, errs = lines_of(oai, done.output_file_id), lines_of(oai, done.error_file_id)
    assert len(out) == done.request_counts.completed and len(errs) == done.request_counts.failed
    assert sorted(x["custom_id"] for x in out + errs) == sorted(f"x{i}" for i in range(n))
    assert {x["error"]["code"] for x in errs if x["response"] is None} == {"batch_cancelled"}
    # Cancelled means the engine never saw most of them
    assert attempts(redis.Redis.from_url(redis_server.url), batch.id, n).count(0) >= n // 2
    with pytest.raises(openai.ConflictError, match="already cancelled"):
        oai.batches.cancel(batch.id)


def test_batches_list_newest_first_by_page_and_files_delete(oai: openai.OpenAI, tmp_path: Path) -> None:
    # Lines for a model nobody serves: the batches stay in progress until cancelled
    line = completion_line("idle")
    line["body"]["model"] = "tiny-batches-unserved"
    src = jsonl(tmp_path / "in.jsonl", [line])
    made = [submit(oai, src).id for _ in range(3)]

    assert [b.id for b in oai.batches.list(limit=3).data] == made[::-1]
    first_page = oai.batches.list(limit=2)
    assert [b.id for b in first_page.data] == made[:0:-1] and first_page.has_more
    assert oai.batches.list(limit=2, after=made[1]).data[0].id == made[0]
    for batch_id in made:
        oai.batches.cancel(batch_id)
    ended = [wait_batch(oai, b, lambda b: b.status in FINAL, timeout_s=30) for b in made]
    assert [b.status for b in ended] == ["cancelled"] * 3

    uploaded = oai.files.create(file=src.open("rb"), purpose="batch")
    assert oai.files.content(uploaded.id).content == src.read_bytes()
    assert oai.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        oai.files.content(uploaded.id)
    assert uploaded.id not in [f.id for f in oai.files.list()]
    with pytest.raises(openai.BadRequestError, match="No file with id") as refused:
        oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    assert refused.value.param == "input_file_id"


def test_an_upload_over_files_max_bytes_is_refused_naming_the_limit(oai: openai.OpenAI, files_gateway: GatewayProcess,
                                                                     tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * 200_001)
    with pytest.raises(openai.BadRequestError, match=r"files\.max_bytes \(200000 bytes\)"):
        oai.files.create(file=big.open("rb"), purpose="batch")
    # Nothing of it is left behind: neither a file nor a temporary one
    folder = Path(files_gateway.log_path.parent / "files")
    assert not [p for p in os.listdir(folder) if p.startswith(".")]
