"""What operators run: compose.yaml's commands, Flower's view of the jobs, the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from devtools.redis_server import free_port
from producer import Client, CompletionJob, JobTimeout, Sampling, Settings, keys
from producer.errors import BrokerUnavailable
from producer.protocol import WorkerInfo
from producer.settings import MetricsSettings
from tests.conftest import MODEL, ROOT

WORKER_CMD = ["celery", "-A", "worker", "worker"]


def test_compose_runs_the_commands_the_readme_and_tests_use() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    readme = (ROOT / "README.md").read_text()
    assert compose["worker"]["command"] == WORKER_CMD
    assert " ".join(WORKER_CMD) in readme
    assert compose["flower"]["command"][:4] == ["celery", "-A", "worker", "flower"]
    assert "celery -A worker flower" in readme
    assert compose["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert compose["gateway"]["command"][:2] == ["vqueue", "gateway"]
    assert "vqueue gateway" in readme
    # The tests start the worker with the same command (plus logging flags only).
    assert '"-A", "worker", "worker"' in (ROOT / "devtools" / "worker_process.py").read_text()


#: The worker's Prometheus port: compose's scrape targets must use the setting's default.
WORKER_METRICS_PORT = MetricsSettings().port
HEALTH_CHECK = ["vqueue", "health", "--worker"]


def _workers(compose: dict) -> dict[str, dict]:
    return {name: service for name, service in compose.items() if service.get("command") == WORKER_CMD}


def _required_variable(value: str, name: str) -> bool:
    """``value`` is compose's ``${NAME:?message}``: the variable's value, or compose refuses to start."""
    return re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", value) is not None


def _option(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def test_compose_is_safe_by_default() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    redis_cmd = compose["redis"]["command"]
    # Redis asks for a password that comes from the environment, never one written here.
    assert _required_variable(_option(redis_cmd, "--requirepass"), "REDIS_PASSWORD")
    # Durable and never evicting: AOF, fsync every second, noeviction.
    assert _option(redis_cmd, "--appendonly") == "yes" and _option(redis_cmd, "--appendfsync") == "everysec"
    assert _option(redis_cmd, "--maxmemory-policy") == "noeviction"
    # Redis is not published at all (compose's network only); anything published is on loopback.
    assert "ports" not in compose["redis"]
    for service in compose.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{port} is published on every interface"
    # Every worker, the gateway and Flower reach Redis with that password.
    users = [name for name, service in compose.items() if "VQUEUE_REDIS__URL" in service.get("environment", {})]
    assert sorted(users) == sorted([*_workers(compose), "gateway", "flower"])
    for name in users:
        url = compose[name]["environment"]["VQUEUE_REDIS__URL"]
        scheme, _, rest = url.partition("://:")
        password, _, host = rest.rpartition("@")
        assert scheme == "redis" and _required_variable(password, "REDIS_PASSWORD") and host == "redis:6379/0"
    # Flower asks for a login (its --basic-auth option, read from FLOWER_BASIC_AUTH), never opens its API.
    flower_env = compose["flower"]["environment"]
    assert _required_variable(flower_env["FLOWER_BASIC_AUTH"], "FLOWER_BASIC_AUTH")
    assert "FLOWER_UNAUTHENTICATED_API" not in flower_env
    assert compose["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    # The gateway asks for an API key that comes from the environment.
    keys = compose["gateway"]["environment"]["VQUEUE_GATEWAY__API_KEYS"]
    assert keys.startswith('["') and keys.endswith('"]') and _required_variable(keys[2:-2], "GATEWAY_API_KEY")


def test_no_secret_is_in_the_repository() -> None:
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^REDIS_PASSWORD=change-me", example, re.M) and re.search(r"^FLOWER_BASIC_AUTH=\w+:change-me",
                                                                                example, re.M)  # fmt: skip
    assert re.search(r"^GATEWAY_API_KEY=change-me", example, re.M)
    assert re.search(r"^GRAFANA_ADMIN_PASSWORD=change-me", example, re.M)
    # Every variable compose requires is in the example, and nothing else.
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "compose.yaml").read_text()))
    assert required == set(re.findall(r"^(\w+)=", example, re.M))
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert ".env" not in tracked
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, ".env must be in .gitignore"


def test_readme_gives_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "scripts/demo.sh" in readme and "scripts/test.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_flower_asks_for_its_login(flower) -> None:
    for path in ("/", "/api/tasks", "/api/workers"):
        assert flower.status(path, login=None) == 401, path
        assert flower.status(path, login="operator:wrong") == 401, path
        assert flower.status(path) == 200, path


def test_flower_shows_the_worker_and_each_job_with_trimmed_arguments(worker, client, flower) -> None:
    job = CompletionJob(model=MODEL, prompt="word " * 500, sampling=Sampling(max_tokens=4, temperature=0))
    client.result(client.submit(job), timeout=60)
    deadline = time.monotonic() + 30
    while (task := flower.get("/api/tasks").get(job.id)) is None or task.get("state") != "SUCCESS":
        assert time.monotonic() < deadline, f"Flower never showed {job.id} succeeded: {task}"
        time.sleep(0.5)
    assert task["name"] == "vqueue.generate"
    assert task["worker"].startswith("celery@")
    assert task["worker"] in flower.get("/api/workers?refresh=1")  # Flower lists the worker that ran it
    assert "completion" in task["args"] and len(task["args"]) < 400  # not the 2,500-character prompt


PASSWORD = "test-only-redis-password"


def _start_redis(tmp_path: Path, *args: str) -> subprocess.Popen:
    log = open(tmp_path / "redis.log", "wb")  # noqa: SIM115 - the server's output, for failures
    return subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "",
                             "--appendonly", "no", "--requirepass", PASSWORD, *args], stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip


def _wait_for(url: str, proc: subprocess.Popen, tmp_path: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, (tmp_path / "redis.log").read_text()
        try:
            redis.Redis.from_url(url).ping()
            return
        except redis.ConnectionError:
            assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
            time.sleep(0.05)


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = _start_redis(tmp_path, "--port", str(port))
    try:
        _wait_for(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", proc, tmp_path)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _round_trip_without_a_worker(url: str) -> None:
    """Submit, see it queued and PENDING, and time out reading it: every Redis path the client has."""
    with Client(Settings(redis={"url": url})) as client:
        job_id = client.submit(CompletionJob(model="secured", prompt="x"))
        assert client.queue_length("secured") == 1 and client.state(job_id) == "PENDING"
        assert client.models() == []
        with pytest.raises(JobTimeout, match=r"vqueue\.secured \(1 waiting\)"):
            client.result(job_id, timeout=1)


def test_redis_url_with_a_password_works_and_a_wrong_one_is_refused_naming_redis_url(redis_with_password) -> None:
    port = redis_with_password
    _round_trip_without_a_worker(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
    for url in (f"redis://:wrong-password@127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"):
        with Client(Settings(redis={"url": url})) as client, pytest.raises(BrokerUnavailable) as info:
            client.submit(CompletionJob(model="secured", prompt="x"))
        assert "redis.url" in str(info.value) and "wrong-password" not in str(info.value)
    with Client(Settings(redis={"url": f"redis://:{PASSWORD}@127.0.0.1:{port}/0"})) as client:
        assert client.queue_length("secured") == 1  # only the first, authenticated submit got through


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signed for localhost / 127.0.0.1 (openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed (apt-get install -y openssl)")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=vqueue test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "san.ext")  # fmt: skip
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


def test_rediss_url_verifies_the_server_certificate(tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path)
    port = free_port()
    proc = _start_redis(tmp_path, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no")
    try:
        trusted = f"rediss://:{PASSWORD}@localhost:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
        _wait_for(trusted, proc, tmp_path)
        _round_trip_without_a_worker(trusted)
        # Without the CA that signed it, the server's certificate is refused.
        untrusted = f"rediss://:{PASSWORD}@localhost:{port}/0?ssl_cert_reqs=required"
        with Client(Settings(redis={"url": untrusted})) as client, pytest.raises(BrokerUnavailable) as info:
            client.submit(CompletionJob(model="secured", prompt="x"))
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) and PASSWORD not in str(info.value)
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_complete_chat_and_result(worker, redis_server) -> None:
    env = {**os.environ, "VQUEUE_REDIS__URL": redis_server.url, "VQUEUE_MODEL__SERVED_NAME": MODEL, "COLUMNS": "200"}
    vqueue = str(Path(sys.executable).with_name("vqueue"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([vqueue, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)

    done = run("complete", "你好，你是谁", "--max-tokens", "8", "--temperature", "0", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["completion_tokens"] == 8

    chat = run("chat", "--system", "Be brief.", "What is a queue?", "--max-tokens", "4", "--temperature", "0")
    assert chat.returncode == 0, chat.stderr
    assert re.search(r"prompt \d+ \+ completion 4 = \d+ tokens", chat.stderr), chat.stderr

    job_id = run("complete", "later", "--max-tokens", "3", "--no-wait").stdout.strip()
    later = run("result", job_id, "--json")
    assert later.returncode == 0 and json.loads(later.stdout)["id"] == job_id

    bad = run("complete", "x", "--max-tokens", "0")
    assert bad.returncode == 2 and "max_tokens" in bad.stderr


def _vqueue(*args: str, redis_url: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "VQUEUE_REDIS__URL": redis_url, "COLUMNS": "200", **env}
    return subprocess.run([str(Path(sys.executable).with_name("vqueue")), *args], env=environment, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_health_check_passes_for_this_hosts_live_worker(worker, redis_server) -> None:
    # Bug caught: a health check that looks for the wrong key or node name (compose and
    # Kubernetes would restart a healthy worker forever), or passes without reading Redis.
    check = _vqueue("health", "--worker", redis_url=redis_server.url)
    assert check.returncode == 0, check.stderr
    assert f"serves {MODEL}" in check.stdout and "last heartbeat" in check.stdout
    assert _vqueue("health", redis_url=redis_server.url).returncode == 0


def test_health_check_fails_on_a_stale_or_absent_heartbeat_and_on_redis_down(redis_server) -> None:
    # Bug caught: a worker whose heartbeat stopped (hung, killed, cut off) still reported healthy.
    r = redis.Redis.from_url(redis_server.url)
    name = "celery@health-check-test"
    r.set(keys.worker_key(name), WorkerInfo(hostname=name, served_name="m", source="s", max_model_len=16,
                                            max_in_flight=1, modalities=["text"], started_at=time.time())
          .model_dump_json(), ex=600)  # fmt: skip
    fresh = _vqueue("health", "--worker", "--hostname", name, redis_url=redis_server.url)
    assert fresh.returncode == 0, fresh.stderr
    # The beat is not renewed: its key expires (not a short TTL set before the check above,
    # which a slow CLI start on a loaded machine outlived)
    r.pexpire(keys.worker_key(name), 1)
    while r.exists(keys.worker_key(name)):
        time.sleep(0.01)
    stale = _vqueue("health", "--worker", "--hostname", name, redis_url=redis_server.url)
    assert stale.returncode == 1 and f"no heartbeat from {name}" in stale.stderr
    absent = _vqueue("health", "--worker", "--hostname", "celery@no-such-worker", redis_url=redis_server.url)
    assert absent.returncode == 1
    down = _vqueue("health", "--worker", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert down.returncode == 4 and "redis.url" in down.stderr


def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def test_compose_runs_one_worker_per_gpu_by_profile_as_the_readme_says() -> None:
    # Bugs caught: two workers on the same GPU (the second's engine runs out of memory), a
    # profile that starts a different number of workers than its name, workers whose
    # environment drifted apart, a README command for a profile that does not exist.
    compose, readme = _compose(), (ROOT / "README.md").read_text()
    workers = _workers(compose)
    assert sorted(workers) == ["worker", "worker-gpu1", "worker-gpu2", "worker-gpu3"]
    gpus = {}
    for name, service in workers.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and "count" not in device
        (gpus[name],) = device["device_ids"]
        assert service["environment"] == workers["worker"]["environment"]
        assert service["stop_grace_period"] == "10m"
        assert service["healthcheck"]["test"] == ["CMD", *HEALTH_CHECK]
    assert sorted(gpus.values()) == ["0", "1", "2", "3"]
    assert "profiles" not in workers["worker"]  # `docker compose up` alone: one worker, GPU 0
    profiles = {p for service in workers.values() for p in service.get("profiles", [])}
    assert profiles == {"gpus-2", "gpus-4"}
    for profile in profiles:
        running = [n for n, s in workers.items() if "profiles" not in s or profile in s["profiles"]]
        assert sorted(gpus[n] for n in running) == [str(i) for i in range(int(profile.split("-")[1]))]
        assert f"docker compose --profile {profile} up" in readme
    # The health check the workers run exists in the CLI.
    check = subprocess.run([str(Path(sys.executable).with_name("vqueue")), "health", "--help"],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert check.returncode == 0 and "--worker" in check.stdout
    assert "vqueue health --worker" in readme


def test_every_compose_service_has_a_health_check_on_its_own_port() -> None:
    # Bug caught: a service with no health check (compose starts its dependants against a dead
    # one) or one probing a port the service does not listen on (forever unhealthy).
    compose = _compose()
    assert all(service.get("healthcheck", {}).get("test") for service in compose.values()), \
        [n for n, s in compose.items() if "healthcheck" not in s]
    gateway_port = _option(compose["gateway"]["command"], "--port")
    assert gateway_port == str(Settings().gateway.port)
    assert compose["gateway"]["ports"] == [f"127.0.0.1:{gateway_port}:{gateway_port}"]
    assert f"127.0.0.1:{gateway_port}/version" in compose["gateway"]["healthcheck"]["test"][-1]
    flower_port = compose["flower"]["command"][-1].removeprefix("--port=")
    assert f"127.0.0.1:{flower_port}/healthcheck" in compose["flower"]["healthcheck"]["test"][-1]


def test_prometheus_scrapes_every_worker_and_the_gateway_and_grafana_is_provisioned() -> None:
    # Bugs caught: a worker service Prometheus does not scrape (its GPU missing from the
    # dashboard), a scrape port that is not the gateway's, Grafana without its login or its
    # dashboard, a provisioning path that does not match where compose mounts the files.
    compose = _compose()
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert sorted(targets["vqueue-worker"]) == sorted(f"{n}:{WORKER_METRICS_PORT}" for n in _workers(compose))
    assert targets["vqueue-gateway"] == [f"gateway:{_option(compose['gateway']['command'], '--port')}"]
    prometheus = compose["prometheus"]
    mounts = dict(v.split(":", 2)[:2] for v in prometheus["volumes"])
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]

    grafana = compose["grafana"]
    assert _required_variable(grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"], "GRAFANA_ADMIN_PASSWORD")
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["ports"] == ["127.0.0.1:3000:3000"] and prometheus["ports"] == ["127.0.0.1:9090:9090"]
    mounts = dict(v.split(":", 2)[:2] for v in grafana["volumes"])
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    # The dashboard JSON (issue 14's dashboard part) is mounted into the provider's folder.
    dashboard_in_container = mounts["./deploy/grafana/vqueue-dashboard.json"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "vqueue.yaml").read_text())["providers"]
    assert dashboard_in_container == f"{provider['options']['path']}/vqueue-dashboard.json"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]


def test_flower_health_check_page_needs_no_login(flower) -> None:
    # compose's Flower health check reads /healthcheck without credentials; everything else asks.
    assert flower.status("/healthcheck", login=None) == 200
