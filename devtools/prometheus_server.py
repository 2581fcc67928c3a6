"""A throwaway ``prometheus`` (Debian's package) on a free port, scraping given targets.

Not the system service: the binary, started with a config and a TSDB folder of its own in a
temporary directory, a short scrape interval, and stopped on ``close()``. Queried over its HTTP
API (``/api/v1/query``, ``/api/v1/query_range``, ``/api/v1/targets``), as Grafana would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from devtools.redis_server import free_port
from devtools.subprocesses import stop, wait_until_answers


class PrometheusError(RuntimeError):
    """Raised when Prometheus answers a query with an error (``status`` not "success")."""


class PrometheusClient:
    """Prometheus's HTTP API at ``base`` (any Prometheus: the one started here, or a deployment's)."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # a bad query is a 400 with the error in the body
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, each with ``labels.job``, ``health`` and ``lastError``."""
        return self._get("/api/v1/targets")["activeTargets"]

    def wait_targets_up(self, timeout_s: float = 60) -> None:
        """Until every target was scraped successfully (else the error says which and why)."""
        deadline = time.monotonic() + timeout_s
        while True:
            targets = self.targets()
            if targets and all(t["health"] == "up" for t in targets):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus targets not up: " + "; ".join(
                    f"{t['scrapeUrl']}: {t['health']} {t['lastError']}" for t in targets))
            time.sleep(0.3)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result: a list of ``{"metric": labels, "value": [t, "v"]}``."""
        return self._get("/api/v1/query", {"query": promql})["result"]

    def query_range(self, promql: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        """A range query's result: a list of ``{"metric": labels, "values": [[t, "v"], ...]}``."""
        return self._get("/api/v1/query_range", {"query": promql, "start": repr(start), "end": repr(end),
                                                  "step": repr(step_s)})["result"]

    def value(self, promql: str) -> float:
        """The one value of a query that must return exactly one series (else PrometheusError)."""
        result = self.query(promql)
        if len(result) != 1:
            raise PrometheusError(f"{promql}: {len(result)} series, not 1: {result}")
        return float(result[0]["value"][1])

    def wait_for(self, promql: str, expected: float, timeout_s: float = 30) -> float:
        """Until ``promql``'s one value equals ``expected`` (the next scrapes bring it); returns the
        last value seen, which the caller asserts on."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                got = self.value(promql)
            except PrometheusError:
                got = float("nan")
            if got == expected or time.monotonic() > deadline:
                return got
            time.sleep(0.3)


class PrometheusServer(PrometheusClient):
    """Starts ``prometheus`` scraping ``targets`` (job name -> ["host:port", ...]) every
    ``scrape_interval_s``; ``query`` and ``query_range`` return the API's ``data``."""

    def __init__(self, targets: dict[str, list[str]], directory: Path | None = None,
                 scrape_interval_s: float = 1.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: run `apt-get install -y prometheus` "
                               "(scripts/setup.sh does) or put it on PATH.")
        self.dir = Path(directory or tempfile.mkdtemp(prefix="vqueue-prometheus-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        interval = f"{int(scrape_interval_s * 1000)}ms"
        config = {  # JSON is YAML: no YAML writer needed
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": job, "scrape_interval": interval, "scrape_timeout": interval,
                                "static_configs": [{"targets": hosts}]} for job, hosts in targets.items()],
        }  # fmt: skip
        (self.dir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self.log_path = self.dir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d",
             # A short lookback: a series that stopped (a finished burst) leaves instant queries sooner.
             "--query.lookback-delta=30s"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60) -> PrometheusServer:
        wait_until_answers(self.base + "/-/ready", self.proc, self.log_path, "prometheus", timeout_s)
        return self

    def close(self) -> None:
        stop(self.proc, 3)  # its TSDB is a throwaway: no need to wait for a clean flush
        self._log.close()

    def __enter__(self) -> PrometheusServer:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.close()
