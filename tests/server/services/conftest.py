"""One real server that the service modules share (one per pytest process, so one per xdist
worker), its private adapters root, and a quiet start for each test.

Tests here change the server's state (aliases, loaded adapters, new adapters on disk, sessions);
each uses names no other test uses and asserts only on what it set up, so the modules pass alone,
together and in any order.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from server.app import RunningServer, start_in_thread
from server.config import ServerConfig
from tests.server.services.calls import SHORT, loaded

QUIET_TIMEOUT_S = 30.0


@pytest.fixture(scope="session")
def served_root(adapters_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy: these tests add aliases and adapters."""
    root = tmp_path_factory.mktemp("api") / "adapters"
    shutil.copytree(adapters_root, root)
    return root


@pytest.fixture(scope="session")
def server(tiny_base: Path, served_root: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The tiny base with at most 2 loaded adapters, a sessions database and metrics."""
    config = ServerConfig.build(
        base=str(tiny_base), adapters_root=served_root, port=0, device="cpu", max_batch=8,
        max_loaded_adapters=2, max_queue=64, default_max_new_tokens=SHORT,
        max_new_tokens_limit=512, metrics_port=free_port(),
        sessions_db=tmp_path_factory.mktemp("db") / "sessions.db",
        shutdown_grace_seconds=1.0,
    )
    running = start_in_thread(config)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def quiet_server(admin: pb_grpc.AdapterServiceStub) -> None:
    """Wait until no adapter row is running: a stream an earlier test cancelled (in any module)
    is freed asynchronously and must not count in this test's in-flight or unload checks."""
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    while busy := {key: a.in_flight for key, a in loaded(admin).items() if a.in_flight}:
        if time.monotonic() > deadline:
            pytest.fail(f"rows still running {QUIET_TIMEOUT_S}s after an earlier test: {busy}")
        time.sleep(0.05)
