"""What the helper processes of the tests and benchmarks (gateway, Prometheus, `vllm serve`,
Flower) share: waiting for one to answer over HTTP, and stopping one."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path


def wait_until_answers(url: str, proc: subprocess.Popen, log_path: Path, what: str, timeout_s: float,
                       interval_s: float = 0.2) -> None:
    """Poll ``url`` until it answers (any 2xx); fail with the end of the log if ``proc`` exits or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not answering {url} after {timeout_s:g} s:\n{_tail(log_path)}") from None
            time.sleep(interval_s)


def stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-4000:] if log_path.exists() else "(no log)"
