"""``celery -A worker worker`` as a subprocess in its own process group, for the demo and tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


#: vLLM on a CPU: a small KV cache, OpenMP bound to one core, never the hub, caches in a
#: temp folder (vLLM otherwise writes to ~/.cache/vllm and leaves IPC sockets in $TMPDIR).
def cpu_engine_env(cache_dir: Path) -> dict[str, str]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "auto",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
        "VLLM_RPC_BASE_PATH": str(cache_dir),
        "XDG_CACHE_HOME": str(cache_dir / "xdg"),
    }


def tiny_model_env(model_dir: Path, redis_url: str, served_name: str = "tiny-qwen2-vl") -> dict[str, str]:
    """Settings for a worker serving the tiny CPU model (see devtools.tiny_model)."""
    return {
        "VQUEUE_REDIS__URL": redis_url,
        "VQUEUE_MODEL__SOURCE": str(model_dir),
        "VQUEUE_MODEL__SERVED_NAME": served_name,
        "VQUEUE_ENGINE__MAX_MODEL_LEN": "1024",
        "VQUEUE_ENGINE__MAX_NUM_SEQS": "64",
        "VQUEUE_ENGINE__MAX_NUM_BATCHED_TOKENS": "2048",
        "VQUEUE_ENGINE__ENFORCE_EAGER": "true",
        "VQUEUE_WORKER__MAX_IN_FLIGHT": "64",
        "VQUEUE_WORKER__LOG_STATS_INTERVAL_S": "2",
        "VQUEUE_WORKER__HEARTBEAT_S": "1",
        "VQUEUE_WORKER__LOG_EACH_JOB": "true",  # tests count Celery's "received" lines
    }


class WorkerProcess:
    """Runs the plain ``celery -A worker worker`` with extra environment; waits until it is ready.

    The worker starts in its own session so that ``kill()`` can take its vLLM engine
    processes down with it (they outlive a SIGKILLed parent otherwise).
    """

    def __init__(self, env: dict[str, str], log_path: Path | None = None, cwd: Path | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="vqueue-worker-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # `python -m celery` is the `celery` script, also where no script was installed (--target installs).
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO", *extra_args],
            env={**os.environ, **env}, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 300) -> None:
        """Until the worker logs that it is ready (engine built, consuming)."""
        deadline = time.monotonic() + timeout_s
        while " ready." not in self.log_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready after {timeout_s:g} s:\n{self.log_text()[-4000:]}")
            time.sleep(0.5)

    def terminate(self, timeout_s: float = 120, *, group: bool = False) -> int:
        """SIGTERM (Celery's warm shutdown) to the worker, or to its whole process group as
        systemd or a terminal's Ctrl-C would; returns the exit code."""
        family = self._descendants()
        if self.proc.poll() is None:
            if group:
                os.killpg(self.proc.pid, signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap(family)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the worker and every process it started (its engine processes)."""
        family = self._descendants()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reap(family)

    def _descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def _reap(self, family: list[psutil.Process]) -> None:
        # The engine runs in a session of its own, so the worker's process group is not enough.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for proc in [*family, *self._descendants()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self._log.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()
