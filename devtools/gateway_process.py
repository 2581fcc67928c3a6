"""``vqueue gateway`` as a subprocess on a free loopback port, for tests and scripts (``python -m gateway``)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from devtools.redis_server import free_port
from devtools.subprocesses import stop, wait_until_answers

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
        wait_until_answers(self.base + "/version", self.proc, self.log_path, "gateway", timeout_s)
        return self

    def close(self) -> None:
        stop(self.proc, 15)
        self._log.close()


def start_gateway(redis_url: str, tmp: Path, **settings: str) -> GatewayProcess:
    env = {"VQUEUE_REDIS__URL": redis_url, **{f"VQUEUE_{k.upper()}": v for k, v in settings.items()}}
    return GatewayProcess(env, tmp / f"gateway-{uuid.uuid4().hex[:6]}.log").wait_ready()
