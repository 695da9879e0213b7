"""deploy/k8s passes the Kubernetes schemas (strict: unknown fields are errors) and agrees with the
code: the server CLI accepts the container's flags, the probes hit the gRPC port, the
autoscaler reads a metric the server exports, the proxy runs the nginx template the replica test
proves, and every Service selects pods that exist.

Schemas: the `kubernetes-validate` package (the upstream OpenAPI-derived JSON schemas, offline).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from server.cli import build_parser, config_from_args
from server.metrics import Metrics

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e .[test]): "
    "the Kubernetes manifests are NOT schema-checked")

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest release these manifests support
sys.path.insert(0, str(REPO / "bench"))
from replica_stack import NGINX_TEMPLATE  # noqa: E402


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def resources() -> list[dict]:
    return [doc for name in kustomization()["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def one(kind: str, name: str) -> dict:
    found = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(kind: str, name: str) -> dict:
    return one(kind, name)["spec"]["template"]["spec"]["containers"][0]


def schema_errors(resource: dict) -> str | None:
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return str(e)
    return None


def test_the_kustomization_lists_every_manifest() -> None:
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml",
                                                         "prometheus-adapter-values.yaml"}
    assert set(kustomization()["resources"]) == manifests


def test_every_resource_passes_the_strict_schema() -> None:
    kinds = {r["kind"] for r in resources()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds
    failures = {f"{r['kind']}/{r['metadata']['name']}": schema_errors(r) for r in resources()}
    assert {k: v for k, v in failures.items() if v} == {}


def test_the_schema_check_catches_a_misspelled_field() -> None:
    broken = one("Deployment", "switchboard")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    assert "periodSecond" in schema_errors(broken)


def test_the_server_accepts_the_containers_flags_and_uses_the_redis_service() -> None:
    spec = container("Deployment", "switchboard")
    config = config_from_args(build_parser().parse_args(["serve", *spec["args"]]), environ={})
    location = config.sessions_location
    redis = one("Service", "redis")["spec"]["ports"][0]
    assert location.kind == "redis"
    assert location.redis_url == f"redis://redis:{redis['port']}/0"
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert (ports["grpc"], ports["metrics"]) == (config.port, config.metrics_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"]["port"] == config.port  # grpc.health.v1, service ""


def test_the_autoscaler_scales_the_deployment_on_a_metric_the_server_exports() -> None:
    hpa = one("HorizontalPodAutoscaler", "switchboard")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "switchboard"
    assert hpa["minReplicas"] >= 2  # one replica dying must not take the service down
    exported = {m.name for m in Metrics().registry.collect()}
    for metric in hpa["metrics"]:
        name = metric["pods"]["metric"]["name"]
        assert name in exported or name.removesuffix("_total") in exported, name
        assert name in (K8S / "prometheus-adapter-values.yaml").read_text()


def test_the_proxy_runs_the_tested_nginx_template_with_every_placeholder_set() -> None:
    template = one("ConfigMap", "switchboard-proxy-template")["data"]["switchboard.conf.template"]
    assert template == NGINX_TEMPLATE.read_text()
    env = {e["name"]: e["value"] for e in container("Deployment", "switchboard-proxy")["env"]}
    assert set(re.findall(r"\$\{(SWITCHBOARD_\w+)\}", template)) == set(env)
    assert env["SWITCHBOARD_REPLICAS"].startswith("server switchboard-replicas:50051 ")
    replicas = one("Service", "switchboard-replicas")["spec"]
    assert replicas["clusterIP"] == "None"  # headless: the name resolves to every replica


def test_every_service_selects_pods_and_targets_named_ports() -> None:
    workloads = [r for r in resources() if r["kind"] in ("Deployment", "StatefulSet")]
    for service in (r for r in resources() if r["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        pods = [w["spec"]["template"] for w in workloads
                if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service/{service['metadata']['name']} selects no pods"
        named = {p["name"] for pod in pods for c in pod["spec"]["containers"]
                 for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, (service["metadata"]["name"], port)
