"""A throwaway Redis Sentinel group: a master, one replica and one sentinel (quorum 1), on free
ports in a temporary folder, all with one password. Debian's ``redis-server`` and
``redis-sentinel`` (scripts/setup.sh installs both)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from devtools.redis_server import free_port

MASTER_NAME = "vqueue-test"


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `apt-get install -y redis-server redis-sentinel` "
                           "(scripts/setup.sh does) or put it on PATH.")
    return found


class SentinelGroup:
    """Starts the three processes and stops them on ``close()`` / context exit.

    ``url`` is vqueue's ``redis.url`` for the group (kombu's ``sentinel://`` form) and
    ``MASTER_NAME`` its ``redis.sentinel_master``. ``failover()`` is a planned failover
    (``SENTINEL FAILOVER``) that returns once the replica serves as master.
    """

    def __init__(self, password: str, directory: Path | None = None) -> None:
        self.dir = Path(directory or tempfile.mkdtemp(prefix="vqueue-sentinel-"))
        self.password = password
        self.ports = {"a": free_port(), "b": free_port()}
        self.sentinel_port = free_port()
        self._procs: list[subprocess.Popen] = []
        self._logs = []
        try:
            server = _binary("redis-server")
            common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--requirepass", password,
                      "--masterauth", password, "--maxmemory-policy", "noeviction"]  # fmt: skip
            self._start("a", [server, "--port", str(self.ports["a"]), "--dir", str(self._mkdir("a")), *common])
            self._start("b", [server, "--port", str(self.ports["b"]), "--dir", str(self._mkdir("b")), *common,
                              "--replicaof", "127.0.0.1", str(self.ports["a"])])  # fmt: skip
            conf = self._mkdir("sentinel") / "sentinel.conf"  # sentinel rewrites its own config file
            conf.write_text("\n".join([
                f"port {self.sentinel_port}", "bind 127.0.0.1", "daemonize no", f"dir {conf.parent}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.ports['a']} 1",
                f"sentinel auth-pass {MASTER_NAME} {password}",
                f"sentinel down-after-milliseconds {MASTER_NAME} 2000",
                f"sentinel failover-timeout {MASTER_NAME} 10000", "",
            ]))  # fmt: skip
            self._start("sentinel", [_binary("redis-sentinel"), str(conf)])
            self.sentinel = redis.Redis(port=self.sentinel_port, decode_responses=True)
            self._wait(self._replica_is_known, "the sentinel to see the replica in sync")
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"sentinel://:{self.password}@127.0.0.1:{self.sentinel_port}/0"

    def _mkdir(self, name: str) -> Path:
        (self.dir / name).mkdir(parents=True, exist_ok=True)
        return self.dir / name

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        self._procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))

    def _wait(self, ready, what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see the logs in {self.dir}")
            try:
                if ready():
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; see the logs in {self.dir}")
            time.sleep(0.1)

    def server(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password)

    def master_port(self) -> int:
        return int(self.sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)[1])

    def _replica_is_known(self) -> bool:
        replicas = self.sentinel.sentinel_slaves(MASTER_NAME)
        return any(r["port"] == self.ports["b"] and r["master-link-status"] == "ok" for r in replicas)

    def failover(self) -> int:
        """A planned failover: the sentinel promotes the replica and turns the old master into
        its replica. Returns the new master's port once both have their new roles."""
        old = self.master_port()
        self.sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)

        def done() -> bool:
            port = self.master_port()
            return port != old and self.server(port).info("replication")["role"] == "master" \
                and self.server(old).info("replication")["role"] == "slave"

        # Done once the old master is demoted too: until then, a client still holding a
        # connection to it could write there (Sentinel's split-brain window).
        self._wait(done, "the failover")
        return self.master_port()

    def close(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for log in self._logs:
            log.close()

    def __enter__(self) -> SentinelGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
