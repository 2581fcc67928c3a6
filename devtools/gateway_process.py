"""``vqueue gateway`` as a subprocess on a free loopback port, for tests and scripts (``python -m gateway``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from devtools.redis_server import free_port

#: The repository root: the gateway runs there, as ``vqueue gateway`` in a checkout would.
ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess:
    """``python -m gateway`` (= ``vqueue gateway``) on a free loopback port with extra settings in its
    environment; ``wait_ready`` polls ``/version`` and fails with the log if the process died."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        full = {k: v for k, v in os.environ.items() if not k.startswith("VQUEUE_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "--port", str(self.port)],
                                     env={**full, **env}, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60) -> GatewayProcess:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                urllib.request.urlopen(self.base + "/version", timeout=2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway not answering after {timeout_s:g} s:\n{self.log_text()}") from None
                time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def start_gateway(redis_url: str, tmp: Path, **settings: str) -> GatewayProcess:
    env = {"VQUEUE_REDIS__URL": redis_url, **{f"VQUEUE_{k.upper()}": v for k, v in settings.items()}}
    return GatewayProcess(env, tmp / f"gateway-{uuid.uuid4().hex[:6]}.log").wait_ready()
