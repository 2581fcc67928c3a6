"""A throwaway ``redis-server`` on a free port in a temporary folder."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """Starts ``redis-server`` and stops it on ``close()`` / context exit.

    No persistence by default; ``appendonly=True`` writes an AOF (``everysec``, as compose
    runs it) so that ``kill()`` then ``start()`` restarts it from its files on the same port.
    """

    def __init__(self, directory: Path | None = None, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `apt-get install -y redis-server` "
                               "(scripts/setup.sh does) or put it on PATH.")
        self.dir = Path(directory or tempfile.mkdtemp(prefix="vqueue-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                     "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
                     "--daemonize", "no", "--maxmemory-policy", "noeviction"]  # fmt: skip
        self.log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - closed in close()
        self.start()

    def start(self) -> None:
        """Start the server (again, after ``kill()``: from its AOF when it has one); wait for PING."""
        self.proc = subprocess.Popen(self._cmd, stdout=self.log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir / 'redis.log'}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("redis-server did not answer PING within 20 s") from None
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
