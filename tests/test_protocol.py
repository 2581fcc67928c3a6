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
    ("build", "loc", "error_type", "detail"),
    [
        (lambda: CompletionJob(model="m", prompt=""), ("prompt",), "too_short", {"min_length": 1}),
        (lambda: CompletionJob(model="", prompt="x"), ("model",), "string_too_short", {"min_length": 1}),
        (lambda: CompletionJob(model="m", prompt="x", max_token=5), ("max_token",), "extra_forbidden", {}),
        (lambda: Sampling(max_tokens=0), ("max_tokens",), "greater_than_equal", {"ge": 1}),
        (lambda: Sampling(temperature=-0.1), ("temperature",), "greater_than_equal", {"ge": 0}),
        (lambda: Sampling(top_p=0), ("top_p",), "greater_than", {"gt": 0}),
        (lambda: Sampling(stop=[""]), ("stop",), "value_error", "stop strings must be non-empty"),
        (lambda: Sampling(repetition_penalty=0), ("repetition_penalty",), "greater_than", {"gt": 0}),
        (lambda: ChatJob(model="m", messages=[]), ("messages",), "too_short", {"min_length": 1}),
        (lambda: ChatJob(model="m", messages=[{"role": "robot", "content": "x"}]), ("messages", 0, "role"),
         "literal_error", {"expected": "'system', 'user' or 'assistant'"}),
        (lambda: ChatJob(model="m", messages=[{"role": "user", "content": []}]), ("messages", 0, "content"),
         "value_error", "content must hold at least one part"),
        (lambda: CompletionJob(model="m", prompt="x", id="has space"), ("id",), "string_pattern_mismatch", {}),
    ],
)  # fmt: skip
def test_bad_input_is_refused_at_its_field_with_its_limit(build, loc: tuple, error_type: str, detail) -> None:
    with pytest.raises(ValidationError) as info:
        build()
    [error] = info.value.errors()
    assert error["loc"] == loc and error["type"] == error_type
    if isinstance(detail, dict):
        assert detail.items() <= error.get("ctx", {}).items()
    else:
        assert detail in error["msg"]


def test_job_round_trips_through_json() -> None:
    job = ChatJob(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                  sampling=Sampling(max_tokens=3, stop="END"))
    again = parse_job(job.model_dump(mode="json"))
    assert again == job
    assert again.sampling.stop == ["END"]


def test_public_api_is_pinned() -> None:
    assert set(producer.__all__) == {
        "AssistantMessage", "BrokerUnavailable", "ChatJob", "ChatMessage", "Choice", "Client", "CompletionJob",
        "DeadLetter", "EngineDead", "EngineError", "FinishReason", "InvalidJob", "JobError", "JobFailed", "JobResult",
        "JobTimeout", "MalformedMessage", "ModelInfo", "ModelNotServed", "ResponseFormat", "Sampling", "Settings",
        "TextPart", "Timings", "Usage", "VQueueError", "get_settings",
        # job control (issue 10)
        "JobCancelled", "JobExpired", "JobNotFound", "JobRecord", "Quarantined", "QueueFull", "QueueStats",
        # streaming (issue 11)
        "StreamChunk", "StreamEnd",
        # a Redis at its maxmemory
        "RedisFull",
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
    from producer import Client, InvalidJob, Settings

    good = CompletionJob(model="atomic", prompt="fine")
    # Well-formed, but its image is no image: only the submit-time check finds that.
    bad = ChatJob(model="atomic", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])  # fmt: skip
    with Client(Settings(redis={"url": redis_server.url})) as client:
        with pytest.raises(InvalidJob, match="not a readable") as info:
            client.submit_many([good, bad])
        assert info.value.field == "messages.0.content.0.image_url.url"
        assert client.queue_length("atomic") == 0
