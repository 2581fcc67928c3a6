"""The Kubernetes manifests (deploy/k8s): valid against Kubernetes' own schemas, and consistent
with compose.yaml, the settings, the CLI and producer/keys.py. No cluster here: kubernetes-validate
checks the built-in kinds offline; KEDA's kinds (CRDs, not in its schemas) are checked field by field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from producer import keys
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
#: The oldest Kubernetes the manifests are checked against, and the newest bundled.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
HEALTH_CHECK = ["vqueue", "health", "--worker"]
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}


def _resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    # Every manifest is applied: none forgotten in the folder, none listed that is missing.
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    return [doc for name in listed for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _one(kind: str, name_part: str = "") -> dict[str, Any]:
    found = [r for r in _resources() if r["kind"] == kind and name_part in r["metadata"]["name"]]
    assert len(found) == 1, f"expected one {kind} named *{name_part}*, got {[r['metadata']['name'] for r in found]}"
    return found[0]


def _container(resource: dict[str, Any]) -> dict[str, Any]:
    (container,) = resource["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    # Bug caught: a misspelt or misplaced field (strict: unknown fields are errors), which
    # `kubectl apply` would refuse or, worse, silently drop (a probe or a GPU limit that never applies).
    checked = 0
    for resource in _resources():
        if resource["kind"] in KEDA_KINDS:
            continue
        kubernetes_validate.validate(resource, version, strict=True)
        checked += 1
    assert checked == 5  # redis Service + StatefulSet, worker Deployment, gateway Deployment + Service


def test_no_secret_in_the_manifests_and_redis_is_durable_with_a_password() -> None:
    # Bug caught: a password written into a manifest, or Redis without AOF / with eviction
    # (a restart or a full memory would lose queued jobs).
    assert all(r["kind"] != "Secret" for r in _resources())
    redis_set = _one("StatefulSet", "redis")
    container = _container(redis_set)
    cmd = container["command"]
    assert cmd[cmd.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert _env(container)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "vqueue-secrets", "key": "redis-password"}}
    assert cmd[cmd.index("--appendonly") + 1] == "yes" and cmd[cmd.index("--appendfsync") + 1] == "everysec"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]  # the AOF is on the volume
    # The gateway Service is cluster-internal; nothing is exposed by a LoadBalancer or NodePort.
    assert all(r["spec"].get("type", "ClusterIP") == "ClusterIP" for r in _resources() if r["kind"] == "Service")


def test_worker_deployment_matches_compose_and_checks_its_heartbeat() -> None:
    # Bugs caught: a grace period shorter than compose's warm shutdown (the kubelet would SIGKILL
    # jobs in flight), no GPU, probes that call a command the CLI does not have, a worker whose
    # Redis password is not the Secret's.
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    deployment = _one("Deployment", "worker")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    assert container["command"] == compose["worker"]["command"] == ["celery", "-A", "worker", "worker"]
    assert compose["worker"]["stop_grace_period"] == "10m" and pod["terminationGracePeriodSeconds"] == 600
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == HEALTH_CHECK, probe
    env = _env(container)
    names = [e["name"] for e in container["env"]]
    # $(REDIS_PASSWORD) expands only if it is defined earlier in the list.
    assert names.index("REDIS_PASSWORD") < names.index("VQUEUE_REDIS__URL")
    assert env["VQUEUE_REDIS__URL"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
    assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "vqueue-secrets", "key": "redis-password"}}
    check = subprocess.run([str(Path(sys.executable).with_name("vqueue")), *HEALTH_CHECK[1:], "--help"],
                           env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "--worker" in check.stdout, check.stderr


def test_gateway_deployment_and_service_agree_on_the_port_and_ask_for_an_api_key() -> None:
    deployment, service = _one("Deployment", "gateway"), _one("Service", "gateway")
    container = _container(deployment)
    cmd = container["command"]
    assert cmd[:2] == ["vqueue", "gateway"] and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    port = int(cmd[cmd.index("--port") + 1])
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    env = _env(container)
    assert env["VQUEUE_GATEWAY__API_KEYS"] == '["$(GATEWAY_API_KEY)"]'
    assert env["GATEWAY_API_KEY"] == {"secretKeyRef": {"name": "vqueue-secrets", "key": "gateway-api-key"}}
    # Ready while no worker runs (KEDA at zero): the probes must not use /health (503 then).
    assert container["readinessProbe"]["httpGet"]["path"] == "/version"


def test_keda_scales_each_model_on_every_priority_list_of_its_queue() -> None:
    # Bugs caught: KEDA watching only the bare list "vqueue.<model>" (priority 9), so a backlog of
    # default-priority jobs (in "vqueue.<model>\x06\x164") never wakes a worker from zero; the
    # HPA's max-of-triggers instead of the sum; a list name for another model than the worker serves.
    kustomize_namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    scaled, auth = _one("ScaledObject"), _one("TriggerAuthentication")
    deployment = _one("Deployment", "worker")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"name": deployment["metadata"]["name"]}
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    served = _env(_container(deployment))["VQUEUE_MODEL__SERVED_NAME"]
    triggers = spec["triggers"]
    assert {t["metadata"]["listName"] for t in triggers} == set(keys.queue_lists(served).values())
    assert len(triggers) == len(keys.PRIORITIES)
    for t in triggers:
        assert t["type"] == "redis" and t["authenticationRef"] == {"name": auth["metadata"]["name"]}
        # KEDA's CRD: trigger metadata is a map of strings.
        assert all(isinstance(v, str) for v in t["metadata"].values()), t["metadata"]
        assert t["metadata"]["address"] == f"redis.{kustomize_namespace}.svc:6379"
    modifiers = spec["advanced"]["scalingModifiers"]
    assert sorted(modifiers["formula"].split(" + ")) == sorted(t["name"] for t in triggers)
    assert modifiers["metricType"] == "AverageValue" and modifiers["activationTarget"] == "0"
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "vqueue-secrets",
                                               "key": "redis-password"}]  # fmt: skip
