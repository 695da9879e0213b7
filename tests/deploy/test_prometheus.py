"""A real Prometheus scrapes Switchboard under traffic and answers every dashboard panel's query.

Prometheus and promtool come from Debian's `prometheus` package. When they are missing the tests
install it with apt-get (we run as root in CI); they skip, loudly, only where that is impossible.
The dashboard's queries are taken from deploy/grafana/dashboards/switchboard.json, Grafana's
variables substituted, and sent to /api/v1/query: each must return at least one finite value.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy/grafana/dashboards/switchboard.json"
RULES = REPO / "deploy/prometheus/rules.yml"
PROM_CONFIG = REPO / "deploy/prometheus/prometheus.yml"
APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
# Grafana's built-in intervals, as Grafana would expand them for a short test window.
INTERVALS = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "10m"}
ACCELERATOR_ONLY = "switchboard_accelerator_"
DEADLINE_S = 60.0


# ---------------------------------------------------------------- finding or installing Prometheus

def _install_prometheus() -> str:
    """Install Debian's prometheus package; returns why it could not be done ('' on success)."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available (not a Debian/Ubuntu machine)"
    if os.geteuid() != 0:
        return f"not root, cannot run: {' '.join(APT_INSTALL)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], APT_INSTALL):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}"
    return ""


@pytest.fixture(scope="session")
def prometheus_bin() -> tuple[str, str]:
    """Paths of (prometheus, promtool), installing the package if needed."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        why = _install_prometheus()
        if why or not (shutil.which("prometheus") and shutil.which("promtool")):
            pytest.skip(f"PROMETHEUS NOT AVAILABLE, dashboard proof NOT RUN: {why or 'no binary'}"
                        f" -- install it with: {' '.join(APT_INSTALL)}")
    return shutil.which("prometheus"), shutil.which("promtool")  # type: ignore[return-value]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> dict:
        params = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10) as r:
            return json.load(r)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
            return json.load(r)


def _write_config(tmp: Path, target: str) -> Path:
    """The repository's rules, with a 1 s scrape and evaluation so a test sees data in seconds."""
    rules = tmp / "rules.yml"
    shutil.copy(RULES, rules)
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n  - rules.yml\n"
        "scrape_configs:\n  - job_name: switchboard\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    return config


def launch_prometheus(binary: str, workdir: Path, target: str) -> tuple[Prometheus,
                                                                        subprocess.Popen]:
    """Start a real Prometheus scraping `target` every second; returns once it is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = _write_config(workdir, target)
    port = _free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        _wait_ready(prom, proc, log_path)
    except BaseException:
        _terminate(proc)
        raise
    return prom, proc


def _terminate(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def start_prometheus(prometheus_bin: tuple[str, str],
                     tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    procs: list[subprocess.Popen] = []

    def start(target: str) -> Prometheus:
        prom, proc = launch_prometheus(prometheus_bin[0], tmp_path / f"prom{len(procs)}", target)
        procs.append(proc)
        return prom

    yield start
    for proc in procs:
        _terminate(proc)


def _wait_ready(prom: Prometheus, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"prometheus not ready in 30 s: {log.read_text()[-2000:]}")


# ---------------------------------------------------------------- the dashboard's queries

@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str


def dashboard_queries() -> list[PanelQuery]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        PanelQuery(panel["title"], target["refId"], target["expr"])
        for panel in dashboard["panels"] if panel.get("type") != "row"
        for target in panel.get("targets", [])
    ]
    assert queries, "the dashboard has no panel queries"
    return queries


def substitute(expr: str, adapter_regex: str) -> str:
    for name, value in INTERVALS.items():
        expr = expr.replace(name, value)
    expr = expr.replace("${adapter}", adapter_regex).replace("$adapter", adapter_regex)
    assert "$" not in expr.replace("$labels", ""), f"unsubstituted variable in {expr}"
    return expr


def _finite_values(answer: dict) -> list[float]:
    values = []
    for series in answer["data"]["result"]:
        raw = series["value"][1] if "value" in series else series["values"][-1][1]
        if math.isfinite(float(raw)):
            values.append(float(raw))
    return values


def _failing(prom: Prometheus, queries: list[PanelQuery], adapter_regex: str,
             accelerator: bool) -> list[str]:
    """Queries that do not (yet) return a finite value; empty when the dashboard is all data."""
    failing = []
    for q in queries:
        answer = prom.query(substitute(q.expr, adapter_regex))
        assert answer["status"] == "success", f"{q.panel}/{q.ref}: {answer}"
        if ACCELERATOR_ONLY in q.expr and not accelerator:
            continue  # exported only where CUDA is present; the query must still be valid
        if not _finite_values(answer):
            failing.append(f"{q.panel} [{q.ref}] {adapter_regex!r}: {q.expr}")
    return failing


def _panels_without_data(prom: Prometheus, queries: list[PanelQuery], adapter_regex: str,
                         accelerator: bool) -> list[str]:
    """Panels none of whose queries has data for one selected adapter.

    With a single adapter selected, a sparse target (load failures of an adapter that never
    failed) is rightly empty, so the panel as a whole is what must show something.
    """
    failing = _failing(prom, queries, adapter_regex, accelerator)
    panels = {q.panel for q in queries}
    empty = {p for p in panels
             if all(any(f.startswith(f"{p} [{q.ref}]") for f in failing)
                    for q in queries if q.panel == p)}
    return [f"{p} {adapter_regex!r}" for p in sorted(empty)]


def assert_every_panel_has_data(prom: Prometheus, adapters: list[str]) -> None:
    """Poll until every query (adapter = All) and every panel (each named adapter) has data."""
    queries = dashboard_queries()
    accelerator = _server_has_accelerator(prom)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        failing = _failing(prom, queries, ".*", accelerator) + [
            f for a in adapters for f in _panels_without_data(prom, queries, a, accelerator)]
        if not failing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not failing, "panels without data:\n" + "\n".join(failing)
    if not accelerator:
        print(f"NOTE: no CUDA device on the server; {ACCELERATOR_ONLY}* panels checked for "
              "validity only (they are empty by design on a CPU)")


def _server_has_accelerator(prom: Prometheus) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        result = prom.query("switchboard_model_info")["data"]["result"]
        if result:
            return result[0]["metric"].get("device", "").startswith("cuda")
        time.sleep(0.5)
    raise AssertionError("switchboard_model_info never appeared: is the target scraped?")


def assert_adapter_variable(prom: Prometheus, expected: set[str]) -> None:
    """The dashboard's adapter selector: label_values(switchboard_requests_total, adapter)."""
    dashboard = json.loads(DASHBOARD.read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "adapter")
    assert variable["definition"] == "label_values(switchboard_requests_total, adapter)"
    match = urllib.parse.quote("switchboard_requests_total")
    values = set(prom.get(f"/api/v1/label/adapter/values?match[]={match}")["data"])
    assert expected <= values, f"adapter selector offers {values}, expected {expected}"


def assert_recording_rules_evaluate(prom: Prometheus) -> None:
    names = [line.split("record:")[1].strip() for line in RULES.read_text().splitlines()
             if "record:" in line]
    deadline = time.monotonic() + DEADLINE_S
    while True:
        empty = [n for n in names if not prom.query(n)["data"]["result"]]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not empty, f"recording rules without data: {empty}"


# ---------------------------------------------------------------- promtool

def test_promtool_check_rules(prometheus_bin: tuple[str, str]) -> None:
    done = subprocess.run([prometheus_bin[1], "check", "rules", str(RULES)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_config(prometheus_bin: tuple[str, str]) -> None:
    done = subprocess.run([prometheus_bin[1], "check", "config", str(PROM_CONFIG)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in {**labels, "instance": "i"}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _alert(at: str, name: str, labels: dict[str, str], summary: str,
           description: str) -> dict:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{
        "exp_labels": labels,
        "exp_annotations": {"summary": summary, "description": description}}]}


TTFT = "switchboard_time_to_first_token_seconds_bucket"
ALERT_SERIES = [
    _series("switchboard_requests_total", "0+60x20", adapter="alpha@1", code="OK"),
    _series("switchboard_requests_total", "0+30x20", adapter="alpha@1", code="INTERNAL"),
    _series("switchboard_requests_total", "0+60x20", adapter="beta@1", code="OK"),
    _series("switchboard_requests_total", "0+1x20", adapter="beta@1", code="RESOURCE_EXHAUSTED"),
    _series(TTFT, "0+1x20", adapter="alpha@1", le="1"),
    _series(TTFT, "0+60x20", adapter="alpha@1", le="5"),
    _series(TTFT, "0+60x20", adapter="alpha@1", le="+Inf"),
    _series("switchboard_requests_waiting", "250x20"),
    _series("switchboard_queue_capacity", "256x20"),
    _series("switchboard_adapter_load_failures_total", "0 0 1 1 1", adapter="broken@1"),
    _series("up", "0x10", job="switchboard"),
]
EXPECTED_ALERTS = [
    _alert("15m", "SwitchboardHighErrorRate", {"severity": "critical", "adapter": "alpha@1"},
           "Adapter alpha@1: 33.33% of requests fail server-side",
           "More than 5% of RPCs for alpha@1 ended with a server-side status code for 5 minutes."),
    _alert("15m", "SwitchboardSlowTimeToFirstToken",
           {"severity": "warning", "adapter": "alpha@1"},
           "Adapter alpha@1: p95 time to first token is 4.797s",
           "p95 time to first token stayed above 2 s for 10 minutes: "
           "the queue is backing up or prompts are long."),
    _alert("15m", "SwitchboardQueueSaturated", {"severity": "warning", "instance": "i"},
           "Switchboard i: waiting queue 97.66% full",
           "More than 80% of max_queue has been in use for 5 minutes; "
           "new requests will soon get RESOURCE_EXHAUSTED."),
    _alert("15m", "SwitchboardRejectingRequests", {"severity": "warning", "instance": "i"},
           "Switchboard i rejects requests: queue or adapter slots full",
           "RESOURCE_EXHAUSTED answers for 5 minutes: add replicas, raise max_queue, "
           "or raise max_loaded_adapters."),
    _alert("3m", "SwitchboardAdapterLoadFailures", {"severity": "warning", "adapter": "broken@1"},
           "Adapter broken@1 failed to load",
           "1 failed loads in 15 minutes; the server log (search for the adapter name) says why."),
    _alert("5m", "SwitchboardDown",
           {"severity": "critical", "job": "switchboard", "instance": "i"},
           "Switchboard i is not answering metrics scrapes",
           "Prometheus could not scrape /metrics for 2 minutes: the process is down or hung."),
]


def test_alerts_fire_on_synthetic_series(prometheus_bin: tuple[str, str], tmp_path: Path) -> None:
    """promtool's rule unit tests: each alert fires with the labels and text an operator sees."""
    # JSON is YAML, so the unit-test file is written with json.
    tests = tmp_path / "rules_test.yml"
    tests.write_text(json.dumps({
        "rule_files": [str(RULES)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": ALERT_SERIES,
                   "alert_rule_test": EXPECTED_ALERTS}],
    }))
    done = subprocess.run([prometheus_bin[1], "test", "rules", str(tests)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- live: the Metrics hooks alone

class HookTraffic:
    """Calls every Metrics hook the way the engine and the API do, until stopped."""

    ADAPTERS = ("alpha@1", "beta@1", None)

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._rng = random.Random(0)

    def __enter__(self) -> HookTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        m, rng = self.metrics, self._rng
        m.set_info("0.1.0", "tiny-base", "cpu")
        m.set_capacity(256, 16, 2)
        m.set_base_memory(5_000_000)
        while not self._stop.wait(0.05):
            self._churn_adapters()
            m.on_step(4, 4, rng.randint(0, 3), 3)
            for adapter in self.ADAPTERS:
                m.on_tokens(adapter, 1)
                m.observe_inter_token(adapter, rng.uniform(0.005, 0.05))
                code = "OK" if rng.random() > 0.1 else "INTERNAL"
                m.observe_request(adapter, code, rng.uniform(0, 0.05), rng.uniform(0.05, 0.5),
                                  rng.uniform(0.2, 2.0), rng.randint(10, 400), rng.randint(1, 64))
            m.observe_truncation("drop_oldest", 2, rng.randint(10, 100))
            m.set_sessions(rng.randint(1, 10))

    def _churn_adapters(self) -> None:
        m = self.metrics
        m.on_adapter_loaded("alpha@1", 0.2, 4_000)
        m.on_adapter_loaded("beta@1", 0.1, 2_000)
        m.on_adapter_evicted("alpha@1")
        m.on_adapter_loaded("alpha@1", 0.2, 4_000)
        m.on_adapter_load_failed("broken@1")


def test_dashboard_against_metrics_hooks(start_prometheus: Callable[[str], Prometheus]) -> None:
    """The dashboard/metrics contract on its own: real exporter, real Prometheus, no model."""
    metrics = Metrics()
    port = metrics.start_http(0, "127.0.0.1")
    try:
        with HookTraffic(metrics):
            prom = start_prometheus(f"127.0.0.1:{port}")
            assert_every_panel_has_data(prom, ["alpha@1"])
            assert_adapter_variable(prom, {"alpha@1", "beta@1", "__base__"})
            assert_recording_rules_evaluate(prom)
    finally:
        metrics.stop_http()


# ---------------------------------------------------------------- live: the real server

CONTEXT_LENGTH = 256
LIVE_ADAPTERS = ("alpha@1", "beta@1", "alpha@2", "")  # "" is the bare base
FINAL_ADAPTER = "alpha@2"


def _serving_root(adapters_root: Path, dest: Path) -> Path:
    """A copy of the shared adapters plus `broken@1`, whose weights file is garbage."""
    root = dest / "adapters"
    shutil.copytree(adapters_root, root)
    broken = root / "broken" / "1"
    shutil.copytree(root / "alpha" / "1", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["name"] = "broken"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    return root


class ChatTraffic:
    """Real gRPC Chat calls from a few threads: every adapter, the base, long conversations."""

    def __init__(self, target: str, workers: int = 3) -> None:
        from switchboard.v1 import switchboard_pb2 as pb
        from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.codes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True)
                         for w in range(workers)]

    def request(self, adapter: str, *, long: bool = False, session: str = "") -> object:
        pb = self.pb
        turns = 12 if long else 1
        messages = [pb.Message(role=role, content=f"turn {i}: tell me about the weather " * 4)
                    for i in range(turns) for role in ("user", "assistant")][:-1]
        return pb.ChatRequest(
            messages=messages, adapter=adapter, session_id=session,
            sampling=pb.SamplingParams(max_new_tokens=8, temperature=0.0),
            truncation=pb.TRUNCATION_STRATEGY_DROP_OLDEST)

    def chat(self, request: object) -> tuple[object, object]:
        try:
            response, call = self.stub.Chat.with_call(request, timeout=60)
            code = "OK"
        except grpc.RpcError as e:
            response, call, code = None, e, e.code().name
        with self._lock:
            self.codes[code] = self.codes.get(code, 0) + 1
        return response, call

    def _run(self, worker: int) -> None:
        i = worker
        while not self._stop.is_set():
            adapter = LIVE_ADAPTERS[i % len(LIVE_ADAPTERS)] if i < 40 else FINAL_ADAPTER
            self.chat(self.request(adapter, long=i % 5 == 0,
                                   session=f"s{worker}" if i % 7 == 0 else ""))
            i += 1
            # A breath between calls: a steady trickle is enough, and the CPU is shared.
            self._stop.wait(0.05)

    def __enter__(self) -> ChatTraffic:
        # One failed load (garbage weights) and one unknown adapter, before the steady traffic.
        self.chat(self.request("broken@1"))
        self.chat(self.request("no-such-adapter"))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        self.channel.close()


@dataclass
class Live:
    prom: Prometheus
    traffic: ChatTraffic


@pytest.fixture(scope="module")
def live(prometheus_bin: tuple[str, str], tiny_base: Path, adapters_root: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The real server (tiny model, three adapters, two slots) under traffic, scraped live."""
    from server.app import start_in_thread
    from server.config import ServerConfig

    work = tmp_path_factory.mktemp("live")
    config = ServerConfig.build(
        base=str(tiny_base), adapters_root=_serving_root(adapters_root, work), port=0,
        device="cpu", max_batch=8, max_loaded_adapters=2, context_length=CONTEXT_LENGTH,
        default_max_new_tokens=8, sessions_db=work / "sessions.db",
        metrics_port=_free_port(), metrics_host="127.0.0.1", shutdown_grace_seconds=1.0)
    server = start_in_thread(config)
    try:
        prom, proc = launch_prometheus(prometheus_bin[0], work / "prom",
                                       f"127.0.0.1:{server.metrics_port}")
        try:
            with ChatTraffic(server.target) as traffic:
                yield Live(prom, traffic)
        finally:
            _terminate(proc)
    finally:
        server.stop()


def test_real_server_every_panel_has_data(live: Live) -> None:
    assert_every_panel_has_data(live.prom, [FINAL_ADAPTER])
    assert live.traffic.codes.get("OK", 0) > 0, live.traffic.codes


def test_real_server_adapter_selector_and_rules(live: Live) -> None:
    assert_adapter_variable(live.prom, {"alpha@1", "alpha@2", "beta@1", "__base__"})
    assert_recording_rules_evaluate(live.prom)


def test_real_server_counts_failures_evictions_and_truncations(live: Live) -> None:
    """The sparse events behind the alerts were driven for real, not only pre-initialized."""
    checks = {
        "failed load of broken@1":
            'sum(switchboard_adapter_load_failures_total{adapter="broken@1"}) > 0',
        "LRU evictions (3 adapters, 2 slots)": "sum(switchboard_adapter_evictions_total) > 0",
        "NOT_FOUND for an unknown adapter": 'sum(switchboard_requests_total{code="NOT_FOUND"}) > 0',
        "drop_oldest truncations":
            'sum(switchboard_context_truncations_total{strategy="drop_oldest"}) > 0',
        "tokens dropped by truncation": "sum(switchboard_context_tokens_dropped_total) > 0",
    }
    deadline = time.monotonic() + DEADLINE_S
    while True:
        missing = [what for what, expr in checks.items() if not live.prom.query(expr)["data"]
                   ["result"]]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not missing, f"not recorded: {missing}; traffic status codes: {live.traffic.codes}"


def test_real_server_returns_the_request_id_in_metadata(live: Live) -> None:
    # The bare base needs no adapter slot, so the traffic's full slots cannot refuse it.
    response, call = live.traffic.chat(live.traffic.request(""))
    assert response is not None, call
    metadata = dict(call.initial_metadata()) | dict(call.trailing_metadata())
    assert metadata.get("x-request-id") == response.request_id != ""
    own_id = "ops-test-1234"
    _, call = live.traffic.stub.Chat.with_call(
        live.traffic.request(""), metadata=(("x-request-id", own_id),), timeout=60)
    metadata = dict(call.initial_metadata()) | dict(call.trailing_metadata())
    assert metadata.get("x-request-id") == own_id
