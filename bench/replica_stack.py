"""The scale-out stack on loopback: a real redis-server, N `switchboard-server` replicas sharing
it, and a real nginx proxying gRPC to them with adapter affinity (deploy/nginx/templates/).

Used by bench/bench_replicas.py and tests/deploy/test_replicas.py; each part is a context manager
that starts a real process on a free loopback port and stops it (and only it) on exit.
`find_tool` returns None when redis-server or nginx is not installed (`make tools` installs both
from Debian), so callers can skip and say why.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "templates" / "switchboard.conf.template"
ADAPTER_HEADER = "x-switchboard-adapter"
START_TIMEOUT_S = 180.0


def find_tool(name: str) -> str | None:
    """The executable's path; Debian puts nginx in /usr/sbin, which a user's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on {port} after 30 s: {_tail(log)}")


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A durable redis-server (AOF, fsync on every write) on a free port; yields its URL."""
    binary = find_tool("redis-server")
    assert binary, "redis-server is not installed (make tools)"
    workdir.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), workdir / "redis.log"
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--daemonize", "no", "--logfile", str(log)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, process, "redis-server", log)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(process)


@dataclass
class Replica:
    """One `switchboard-server serve` process; its port is read from its "ready on" line."""

    process: Any  # subprocess.Popen, or what replicas(start=...) returned
    log: Path
    port: int = 0
    metrics_port: int = 0  # 0: started without Prometheus metrics

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self) -> Replica:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(r"ready on [^ ]+:(\d+)", self.log.read_text(errors="replace"))
            if found:
                self.port = int(found.group(1))
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"replica exited with {self.process.returncode}: "
                                   f"{_tail(self.log)}")
            time.sleep(0.1)
        raise RuntimeError(f"replica not ready after {START_TIMEOUT_S}s: {_tail(self.log)}")

    def adapter_loads(self) -> int:
        """Adapters this replica has loaded since it started (its Prometheus counter)."""
        import urllib.request

        assert self.metrics_port, "started without metrics (replicas(..., metrics=True))"
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return int(sum(float(m) for m in re.findall(
            r"^switchboard_adapter_loads_total\{[^}]*\} (\S+)$", text, re.MULTILINE)))

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye, as when a machine or container dies."""
        _stop(self.process, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.process)


def server_process(argv: list[str], log: Path,
                   env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m server.cli ARGV` from the project's root, its output written to `log`, in
    `env` (by default this process's environment, unbuffered)."""
    if env is None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as sink:
        return subprocess.Popen([sys.executable, "-m", "server.cli", *argv], cwd=ROOT,
                                stdout=sink, stderr=sink, env=env)


@contextlib.contextmanager
def replicas(n: int, workdir: Path, base: Path, adapters: Path, sessions_url: str,
             extra: Sequence[str] = (), metrics: bool = False,
             start: Callable[[list[str], Path], Any] = server_process,
             ) -> Iterator[list[Replica]]:
    """`n` replicas on free ports, all started before any is waited for (they load in parallel);
    with `metrics`, each also serves Prometheus metrics on a free port. `start(argv, log)`
    starts one (the tests fork theirs from a process that has the imports done)."""
    started: list[Replica] = []
    try:
        for i in range(n):
            log = workdir / f"replica-{i}.log"
            metrics_port = free_port() if metrics else 0
            argv = ["serve", "--base", str(base), "--adapters-root", str(adapters), "--port", "0",
                    "--device", "cpu", "--sessions", sessions_url, "--shutdown-grace-seconds",
                    "1", "--metrics-port", str(metrics_port), *extra]
            started.append(Replica(start(argv, log), log, metrics_port=metrics_port))
        yield [replica.wait_ready() for replica in started]
    finally:
        for replica in started:
            replica.stop()


def render_nginx(listen: str, targets: Sequence[str], access_log: Path) -> str:
    """The deploy template with these replicas; every ${SWITCHBOARD_...} must be filled."""
    servers = "\n    ".join(f"server {t} max_fails=1 fail_timeout=10s;" for t in targets)
    text = string.Template(NGINX_TEMPLATE.read_text()).safe_substitute(
        SWITCHBOARD_LISTEN=listen, SWITCHBOARD_REPLICAS=servers,
        SWITCHBOARD_ACCESS_LOG=str(access_log))
    left = re.findall(r"\$\{SWITCHBOARD_\w+\}", text)
    if left:
        raise ValueError(f"the nginx template has unfilled placeholders: {left}")
    return text


@dataclass
class Proxy:
    """The running nginx: where clients dial, and its access log (one line per call)."""

    port: int
    access_log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def routes(self) -> list[tuple[str, str, str]]:
        """(adapter header, replica that answered, grpc status) per logged call, in order. When
        nginx tried several replicas it logs them all ("a:1, b:2"); the last one answered."""
        pattern = re.compile(r'adapter="([^"]*)" upstream=(.+?) grpc_status=(\S*)')
        text = self.access_log.read_text() if self.access_log.exists() else ""
        return [(adapter, upstream.split(", ")[-1], status)
                for adapter, upstream, status in pattern.findall(text)]


@contextlib.contextmanager
def nginx_proxy(workdir: Path, targets: Sequence[str]) -> Iterator[Proxy]:
    """nginx in the foreground with its own prefix, pid, logs and temp paths under `workdir`."""
    binary = find_tool("nginx")
    assert binary, "nginx is not installed (make tools)"
    workdir.mkdir(parents=True, exist_ok=True)
    # As root, nginx's workers run as nobody: they must be able to reach the temp paths.
    workdir.chmod(0o755)
    port, log, access = free_port(), workdir / "error.log", workdir / "access.log"
    temps = "\n".join(f"    {kind}_temp_path {workdir / kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (workdir / "nginx.conf").write_text(
        f"worker_processes 1;\ndaemon off;\npid {workdir / 'nginx.pid'};\n"
        f"error_log {log} info;\nevents {{ worker_connections 1024; }}\n"
        f"http {{\n{temps}\n{render_nginx(f'127.0.0.1:{port}', targets, access)}\n}}\n")
    process = subprocess.Popen([binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"),
                                "-e", str(log)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, process, "nginx", log)
        yield Proxy(port, access)
    finally:
        _stop(process, signal.SIGQUIT)  # graceful: finish the calls in flight, then exit


class Caller:
    """Raw gRPC calls through the proxy, each carrying its adapter in the affinity header (as
    the Python client does), with the replica-level reads (loaded adapters) tests need."""

    def __init__(self, target: str) -> None:
        import grpc
        from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

        self.channel = grpc.insecure_channel(target)
        self.infer = pb_grpc.InferenceServiceStub(self.channel)
        self.sessions = pb_grpc.SessionServiceStub(self.channel)

    def chat(self, adapter: str, text: str, session_id: str = "", max_new_tokens: int = 4,
             timeout: float = 60.0, ignore_eos: bool = False):  # noqa: ANN201 - ChatResponse
        from switchboard.v1 import switchboard_pb2 as pb

        sampling = pb.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
        request = pb.ChatRequest(messages=[pb.Message(role="user", content=text)],
                                 adapter=adapter, session_id=session_id, sampling=sampling)
        return self.infer.Chat(request, timeout=timeout,
                               metadata=((ADAPTER_HEADER, adapter),))

    def history(self, session_id: str) -> list[tuple[str, str]]:
        from switchboard.v1 import switchboard_pb2 as pb

        stored = self.sessions.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=30)
        return [(m.role, m.content) for m in stored.messages]

    def loaded(self) -> set[str]:
        """Adapter names resident on the replica this caller dials directly."""
        from switchboard.v1 import switchboard_pb2 as pb
        from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

        listing = pb_grpc.AdapterServiceStub(self.channel).ListAdapters(
            pb.ListAdaptersRequest(), timeout=30)
        return {a.name for a in listing.adapters if a.loaded}

    def unload_all(self) -> None:
        """Unload every adapter resident on the replica this caller dials directly."""
        from switchboard.v1 import switchboard_pb2 as pb
        from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

        admin = pb_grpc.AdapterServiceStub(self.channel)
        for name in self.loaded():
            admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter=name), timeout=30)

    def close(self) -> None:
        self.channel.close()
