"""Process wiring: readiness, config validation, the CLI and graceful shutdown (health and
reflection on a serving server: tests/server/services/test_health_and_reflection.py)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from server.app import RunningServer, start_in_thread
from server.cli import build_parser, config_from_args
from server.config import ServerConfig
from server.keys import KeyKind, KeyRing


def test_port_zero_binds_a_free_port_and_stop_is_graceful(
        tiny_base: Path, adapters_root: Path) -> None:
    running = start_in_thread(ServerConfig(base=str(tiny_base), adapters_root=adapters_root,
                                           port=0, device="cpu", shutdown_grace_seconds=0.2,
                                           sessions_db=None))
    assert running.port > 0 and running.metrics_port == 0
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.AdapterServiceStub(channel)
        assert stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters
    running.stop()
    with grpc.insecure_channel(running.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.AdapterServiceStub(channel).ListAdapters(pb.ListAdaptersRequest(), timeout=2)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_not_serving_until_the_base_is_loaded(tiny_base: Path, adapters_root: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import threading

    import server.app as app

    gate = threading.Event()
    real_load = app.load_base

    def gated_load(*args, **kwargs):  # the real load, held back until the test has looked
        gate.wait(60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(app, "load_base", gated_load)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ServerConfig(base=str(tiny_base), adapters_root=adapters_root, port=port,
                          device="cpu", shutdown_grace_seconds=0.2, sessions_db=None)
    started: dict[str, RunningServer] = {}
    thread = threading.Thread(target=lambda: started.update(s=start_in_thread(config)))
    thread.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="switchboard.v1.InferenceService")
            status = health.Check(request, timeout=30, wait_for_ready=True).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.InferenceServiceStub(channel).Chat(
                    pb.ChatRequest(messages=[pb.Message(role="user", content="hi")]), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in info.value.details()
            gate.set()
            thread.join(120)
            status = health.Check(request, timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()
        thread.join(120)
        if "s" in started:
            started["s"].stop()


def test_bad_base_fails_start_with_its_error(adapters_root: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="did not start"):
        start_in_thread(ServerConfig(base=str(tmp_path / "missing"), adapters_root=adapters_root,
                                     port=0, device="cpu", shutdown_grace_seconds=0.1,
                                     sessions_db=None))


API_KEY = "k-api-0123456789abcdef"
ADMIN_KEY = "k-admin-0123456789abcdef"


def test_keys_come_from_files_and_the_environment(tmp_path: Path) -> None:
    (tmp_path / "api.keys").write_text(f"# app keys\n{API_KEY}\n\n  k-api-second-key-0000  # ci\n")
    (tmp_path / "admin.keys").write_text(ADMIN_KEY + "\n")
    args = build_parser().parse_args([
        "serve", "--base", "tiny", "--adapters-root", str(tmp_path),
        "--api-keys-file", str(tmp_path / "api.keys"),
        "--admin-keys-file", str(tmp_path / "admin.keys")])
    config = config_from_args(args, {"SWITCHBOARD_API_KEYS": "k-api-from-env-00000, " + API_KEY})
    ring = KeyRing(config.key_sources.load())
    assert {ring.kind_of(k) for k in (API_KEY, "k-api-second-key-0000", "k-api-from-env-00000")} \
        == {KeyKind.API}
    assert ring.kind_of(ADMIN_KEY) is KeyKind.ADMIN and len(ring) == 4 and config.auth_enabled
    assert API_KEY not in repr(config) and ADMIN_KEY not in repr(config)


def test_no_keys_means_no_authentication(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--base", "tiny", "--adapters-root", str(tmp_path)])
    assert not config_from_args(args, {}).auth_enabled


def test_an_unreadable_keys_file_is_a_usage_error(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--base", "tiny", "--adapters-root", str(tmp_path),
                                      "--api-keys-file", str(tmp_path / "missing.keys")])
    with pytest.raises(ValueError, match="missing.keys"):
        config_from_args(args, {})


def test_cli_serves_logs_where_and_stops_on_sigterm(tiny_base: Path, adapters_root: Path,
                                                    tmp_path: Path) -> None:
    import re
    import signal
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--base", str(tiny_base),
         "--adapters-root", str(adapters_root), "--port", "0", "--device", "cpu",
         "--sessions-db", str(tmp_path / "s.db"), "--shutdown-grace-seconds", "0.5"],
        stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "ready on" in line:
                break
        log = "".join(lines)
        assert "listening on" in log and re.search(r"loaded base .* in [0-9.]+s", log), log
        port = int(re.search(r"ready on [^ ]+:(\d+)", log).group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
