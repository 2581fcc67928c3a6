"""The OpenAI sampling surface on the real engine: each parameter with a test that fails if it were ignored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from producer import ChatJob, Client, CompletionJob, JobResult, ModelNotServed, Sampling, keys
from tests.conftest import MODEL, ROOT
from tests.test_images import png

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3
IM_START = 151644  # <|im_start|>: a special token, never the tiny model's natural pick


def run(client: Client, **sampling: object) -> JobResult:
    job = CompletionJob(model=MODEL, prompt=PROMPT, sampling=Sampling(**{"temperature": 0, **sampling}))
    return client.result(client.submit(job), timeout=120)


def chat(client: Client, **sampling: object) -> JobResult:
    job = ChatJob(model=MODEL, messages=[{"role": "user", "content": "Say yes or no."}],
                  sampling=Sampling(**{"temperature": 0, **sampling}))
    return client.result(client.submit(job), timeout=120)


def test_n_gives_several_choices_and_sums_usage(worker, client) -> None:
    r = run(client, n=3, max_tokens=5, ignore_eos=True, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 15
    assert r.usage.total_tokens == r.usage.prompt_tokens + 15


def test_completion_logprobs_give_each_token_and_its_alternatives(worker, client) -> None:
    r = run(client, max_tokens=6, ignore_eos=True, logprobs=2)
    steps = r.choices[0].logprobs
    assert steps is not None and len(steps) == 6
    for step in steps:
        assert len(step.top_logprobs) == 2
        assert step.top_logprobs[0].logprob >= step.top_logprobs[1].logprob
        assert step.token_id == step.top_logprobs[0].token_id  # greedy picks the most likely
    assert "".join(s.token for s in steps) == r.text


def test_chat_logprobs_form(worker, client) -> None:
    r = chat(client, max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=3)
    assert [len(s.top_logprobs) for s in r.choices[0].logprobs] == [3, 3, 3, 3]
    assert chat(client, max_tokens=4, ignore_eos=True).choices[0].logprobs is None


def test_response_format_json_schema_constrains_the_output(worker, client) -> None:
    schema = {"type": "string", "enum": ["yes", "no"]}
    r = chat(client, max_tokens=20, response_format={"type": "json_schema",
                                                    "json_schema": {"name": "answer", "schema": schema}})
    assert json.loads(r.text) in ("yes", "no")
    assert r.finish_reason == "stop"


def test_response_format_json_object_starts_an_object(worker, client) -> None:
    free = chat(client, max_tokens=8)
    constrained = chat(client, max_tokens=8, response_format={"type": "json_object"})
    assert constrained.text.lstrip().startswith("{")
    assert not free.text.lstrip().startswith("{")


def test_stop_string_with_and_without_including_it(worker, client) -> None:
    base = run(client, max_tokens=24, ignore_eos=True)
    stop = base.text[len(base.text) // 2 :][:3]
    assert stop.strip(), f"pick a visible stop string from {base.text!r}"
    cut = run(client, max_tokens=24, stop=[stop])
    kept = run(client, max_tokens=24, stop=[stop], include_stop_str_in_output=True)
    assert cut.finish_reason == "stop" and cut.choices[0].stop_reason == stop
    assert stop not in cut.text and base.text.startswith(cut.text)
    assert kept.text == cut.text + stop


def test_min_tokens_overrides_an_early_stop_token(worker, client) -> None:
    first = run(client, max_tokens=1, logprobs=0).choices[0].logprobs[0].token_id
    early = run(client, max_tokens=10, stop_token_ids=[first])
    late = run(client, max_tokens=10, stop_token_ids=[first], min_tokens=5)
    assert early.usage.completion_tokens == 1 and early.finish_reason == "stop"
    assert late.usage.completion_tokens >= 5


def test_logit_bias_forces_a_token(worker, client) -> None:
    r = run(client, max_tokens=4, ignore_eos=True, logprobs=0, logit_bias={9707: 100})  # "Hello"
    assert [s.token_id for s in r.choices[0].logprobs] == [9707] * 4
    assert r.text == "Hello" * 4


def test_skip_special_tokens(worker, client) -> None:
    shown = run(client, max_tokens=3, ignore_eos=True, logit_bias={IM_START: 100}, skip_special_tokens=False)
    hidden = run(client, max_tokens=3, ignore_eos=True, logit_bias={IM_START: 100})
    assert shown.text == "<|im_start|>" * 3
    assert hidden.text == "" and hidden.usage.completion_tokens == 3


def test_truncate_prompt_tokens_keeps_the_last_tokens(worker, client, tokenizer) -> None:
    assert len(tokenizer(PROMPT)["input_ids"]) > 12
    r = run(client, max_tokens=2, truncate_prompt_tokens=12)
    assert r.usage.prompt_tokens == 12


def test_token_id_prompt(worker, client) -> None:
    job = CompletionJob(model=MODEL, prompt=[9707, 11, 1879, 0], sampling=Sampling(max_tokens=3, temperature=0))
    assert client.result(client.submit(job), timeout=60).usage.prompt_tokens == 4


@pytest.mark.parametrize(
    ("sampling", "loc", "error_type", "detail"),
    [
        ({"n": 0}, ("sampling", "n"), "greater_than_equal", {"ge": 1}),
        ({"n": 17}, ("sampling", "n"), "less_than_equal", {"le": 16}),
        # logprobs is bool | int: the int branch's error carries the limit.
        ({"logprobs": 21}, ("sampling", "logprobs", "constrained-int"), "less_than_equal", {"le": 20}),
        ({"top_logprobs": 2}, ("sampling",), "value_error", "top_logprobs needs logprobs=True"),
        ({"logit_bias": {"5": 101}}, ("sampling", "logit_bias", "5"), "less_than_equal", {"le": 100}),
        ({"min_tokens": 9, "max_tokens": 3}, ("sampling",), "value_error",
         "min_tokens (9) must not exceed max_tokens (3)"),
        ({"response_format": {"type": "json_schema"}}, ("sampling", "response_format"), "value_error",
         "response_format.json_schema is required"),
        ({"response_format": {"type": "yaml"}}, ("sampling", "response_format", "type"), "literal_error",
         {"expected": "'text', 'json_object' or 'json_schema'"}),
        ({"truncate_prompt_tokens": 0}, ("sampling", "truncate_prompt_tokens"), "greater_than_equal", {"ge": 1}),
    ],
)  # fmt: skip
def test_bad_sampling_is_refused_at_its_field_with_its_limit(sampling: dict, loc: tuple, error_type: str,
                                                             detail) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionJob(model=MODEL, prompt="x", sampling=sampling)
    matching = [e for e in info.value.errors() if e["loc"] == loc]
    assert matching, f"no error at {loc}: {info.value.errors()}"
    [error] = matching
    assert error["type"] == error_type
    if isinstance(detail, dict):
        assert detail.items() <= error.get("ctx", {}).items()
    else:
        assert detail in error["msg"]


def test_logprobs_forms_are_checked_per_kind() -> None:
    with pytest.raises(ValidationError) as completion:
        CompletionJob(model=MODEL, prompt="x", sampling={"logprobs": True})
    with pytest.raises(ValidationError) as chat:
        ChatJob(model=MODEL, messages=[{"role": "user", "content": "x"}], sampling={"logprobs": 3})
    [completion_error], [chat_error] = completion.value.errors(), chat.value.errors()
    assert completion_error["type"] == chat_error["type"] == "value_error"
    assert "sampling.logprobs: completion jobs take an integer" in completion_error["msg"]
    assert "sampling.logprobs: chat jobs take True/False plus top_logprobs" in chat_error["msg"]


def test_models_lists_live_workers_and_unserved_jobs_wait_or_fail(worker, client, redis_server) -> None:
    [model] = [m for m in client.models() if m.id == MODEL]
    assert model.max_model_len == 1024 and model.modalities == ["image", "text"]
    assert len(model.workers) == 1 and model.source.endswith(MODEL)
    nobody = f"nobody-here-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(ModelNotServed) as info:
            client.submit(CompletionJob(model=nobody, prompt="x"), if_unserved="fail")
        assert info.value.model == nobody and MODEL in info.value.served
        assert client.queue_length(nobody) == 0
        client.submit(CompletionJob(model=nobody, prompt="x"))  # the default waits
        assert client.queue_length(nobody) == 1
    finally:
        redis.Redis.from_url(redis_server.url).delete(keys.queue_for(nobody))


def test_cli_models_and_chat_with_an_image(worker, redis_server, tmp_path: Path) -> None:
    env = {**os.environ, "VQUEUE_REDIS__URL": redis_server.url, "VQUEUE_MODEL__SERVED_NAME": MODEL}
    vqueue = [sys.executable, "-m", "producer.cli"]
    listed = subprocess.run([*vqueue, "models", "--json"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert MODEL in [m["id"] for m in json.loads(listed.stdout)["data"]]
    picture = tmp_path / "cat.png"
    picture.write_bytes(png(64, 48))
    answered = subprocess.run([*vqueue, "chat", "What is this?", "--image", str(picture), "--max-tokens", "3",
                               "--temperature", "0", "--json"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert answered.returncode == 0, answered.stderr
    text_only = subprocess.run([*vqueue, "chat", "What is this?", "--max-tokens", "3", "--temperature", "0",
                                "--json"], env=env, cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    with_image = json.loads(answered.stdout)["usage"]["prompt_tokens"]
    assert with_image > json.loads(text_only.stdout)["usage"]["prompt_tokens"] + 2  # vision tokens counted
