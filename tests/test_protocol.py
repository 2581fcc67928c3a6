"""The job/result protocol: bad input is refused at submit with an error naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

import producer
from producer import ChatJob, CompletionJob, Sampling
from producer.protocol import parse_job


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: CompletionJob(model="m", prompt=""), "prompt"),
        (lambda: CompletionJob(model="", prompt="x"), "model"),
        (lambda: CompletionJob(model="m", prompt="x", max_token=5), "max_token"),
        (lambda: Sampling(max_tokens=0), "max_tokens"),
        (lambda: Sampling(temperature=-0.1), "temperature"),
        (lambda: Sampling(top_p=0), "top_p"),
        (lambda: Sampling(stop=[""]), "stop"),
        (lambda: Sampling(repetition_penalty=0), "repetition_penalty"),
        (lambda: ChatJob(model="m", messages=[]), "messages"),
        (lambda: ChatJob(model="m", messages=[{"role": "robot", "content": "x"}]), "role"),
        (lambda: ChatJob(model="m", messages=[{"role": "user", "content": []}]), "content"),
        (lambda: CompletionJob(model="m", prompt="x", id="has space"), "id"),
    ],
)
def test_bad_input_names_the_field(build, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        build()
    assert field in str(info.value)


def test_job_round_trips_through_json() -> None:
    job = ChatJob(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                  sampling=Sampling(max_tokens=3, stop="END"))
    again = parse_job(job.model_dump(mode="json"))
    assert again == job
    assert again.sampling.stop == ["END"]


def test_public_api_is_pinned() -> None:
    assert set(producer.__all__) == {
        "AssistantMessage", "ChatJob", "ChatMessage", "Choice", "Client", "CompletionJob", "EngineDead",
        "FinishReason", "InvalidJob", "JobError", "JobFailed", "JobResult", "JobTimeout", "ModelInfo", "ModelNotServed",
        "ResponseFormat", "Sampling", "Settings",
        "TextPart", "Timings", "Usage", "VQueueError", "get_settings",
    }  # fmt: skip


def test_producer_imports_no_gpu_stack() -> None:
    code = "import sys, producer, producer.cli; bad = {'vllm', 'torch', 'worker'} & set(sys.modules); print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "set()"


def test_results_from_a_newer_worker_still_parse() -> None:
    from producer import JobResult

    data = {"id": "j", "model": "m", "kind": "completion", "worker": "w", "attempt": 1,
            "choices": [{"index": 0, "text": "hi", "finish_reason": "stop", "new_field": 1}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            "timings": {"enqueued_at": 1, "started_at": 2, "finished_at": 3}, "something_new": True}  # fmt: skip
    assert JobResult.model_validate(data).text == "hi"


def test_submit_many_sends_nothing_if_one_job_is_bad(redis_server) -> None:
    from producer import Client, InvalidJob, Settings, keys

    good = CompletionJob(model="atomic", prompt="fine")
    # Well-formed, but its image is no image: only the submit-time check finds that.
    bad = ChatJob(model="atomic", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])  # fmt: skip
    with Client(Settings(redis={"url": redis_server.url})) as client:
        with pytest.raises(InvalidJob, match="not a readable"):
            client.submit_many([good, bad])
        assert client._redis.llen(keys.queue_for("atomic")) == 0
