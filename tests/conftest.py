"""Session fixtures: the tiny base, the bundled data and a random adapters root are built once
per test run (shared by the xdist workers)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from server_zygote import ForkedProcess, Zygote


def _share_the_cores() -> None:
    """Idle OpenMP workers sleep and each torch pool gets this process's share of the cores: set
    in the environment before anything loads torch, so the subprocesses tests start inherit it."""
    # The suite runs several torch processes at once (in-process servers beside served
    # subprocesses, one pytest worker per core under xdist); spinning OpenMP workers made each
    # of them crawl on 2 shared cores (see common/threads.py). A caller's own setting wins.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))


_share_the_cores()


def _skip_the_unused_compiler() -> None:
    """No torch.compile in the suite's processes: set before anything loads torch, inherited
    by the subprocesses tests start."""
    # bitsandbytes wraps its fallback kernels in torch.compile when it is imported, which loads
    # torch's inductor: about 2 s of CPU in each of the suite's ~30 torch processes. Nothing
    # here compiles (on the CPU bitsandbytes runs its own kernels), so dynamo stays off.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


_skip_the_unused_compiler()


# The modules that hold a worker longest (seconds on 2 idle cores), queued first so that the two
# xdist workers finish together (longest first) instead of one running a long module alone at the
# end. test_fit's worker builds the tiny base (about half a minute) while the other runs the modules
# before and right after it, which need no base, instead of waiting for it; then come the other
# modules of 10-40 s, so that the short ones fill the end. Only an order (the Makefile passes
# --no-loadscope-reorder); a module not named keeps its place after these.
LONGEST_FIRST = (
    "tests/trainer/test_smollm2.py", "tests/trainer/test_fit.py",
    "tests/evalsuite/test_ab_webapp.py", "tests/common/test_threads.py",
    "tests/trainer/test_datagen.py",
    "tests/clients/test_session_chat_cli.py", "tests/trainer/test_fit_ddp.py",
    "tests/server/test_session_durability.py", "tests/server/test_shutdown.py",
    "tests/bench/test_bench_smoke.py", "tests/server/test_faults.py",
    "tests/trainer/test_fit_kill_resume.py", "tests/bench/test_soak_smoke.py",
    "tests/server/test_engine.py", "tests/trainer/test_fit_options.py",
    "tests/deploy/test_prometheus.py", "tests/server/test_fuzz.py", "tests/trainer/test_sweep.py",
    "tests/server/test_ratelimit.py", "tests/evalsuite/test_ab_results.py",
    "tests/evalsuite/test_evalsuite_cli.py", "tests/server/services/test_inference_service.py",
    "tests/trainer/test_spike_rollback.py", "tests/trainer/test_auto_batch.py",
    "tests/server/test_app.py", "tests/server/test_openai_http.py", "tests/trainer/test_base.py",
    "tests/clients/test_http_client.py", "tests/deploy/test_replicas.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture(autouse=True, scope="module")
def _torch_threads_restored():
    """Each module leaves torch's intra-op thread count as it found it: the engine tests run on
    two threads, and an engine started later in the same worker with two (an in-process server)
    would time its threads at start, seconds that test nothing."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else int(os.environ["OMP_NUM_THREADS"])
    yield
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[Path], None]) -> Path:
    """`build(directory)` run once per test run: under xdist the first worker to get here builds
    into the run's shared temp directory while the others wait on a file lock, then all reuse it."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        directory = tmp_path_factory.mktemp(name)
        build(directory)
        return directory
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the one temp root all workers share
    directory, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a build a crashed worker left half done
            directory.mkdir()
            build(directory)
            done.touch()
    return directory


# The suite's base: `trainer init-base`'s tiny base (same tokenizer, corpus and pretraining) with
# 2 decoder layers instead of 4, as the tiny random models of transformers' own tests. Every
# fit, server and engine test runs on it, and the 2 layers cut the suite's CPU time by a fifth;
# nothing here depends on depth beyond "more than one layer".
SUITE_BASE_LAYERS = 2


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny chat base model, built as `trainer init-base` builds it, 2 layers deep."""
    from trainer.base import BaseSpec, build_base

    spec = BaseSpec(num_layers=SUITE_BASE_LAYERS)
    built = built_once(tmp_path_factory, "base",
                       lambda d: build_base(d / "tiny-base", seed=0, spec=spec))
    return built / "tiny-base"


@pytest.fixture(scope="session")
def bundled_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled conversation data, as `trainer make-data` writes it."""
    from trainer.datagen import make_data

    return built_once(tmp_path_factory, "data", lambda d: make_data(d, seed=0))


def write_random_adapter(
    base: Path, root: Path, name: str, version: int, *, seed: int, rank: int = 8,
    target_modules: str | list[str] = "all-linear", fingerprint: str | None = None,
) -> Path:
    """Write a real PEFT adapter with random non-zero A and B and a manifest (serving tests)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from common.modeling import base_fingerprint

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=target_modules, init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    out = root / name / str(version)
    peft_model.save_pretrained(out)
    manifest = {
        "name": name,
        "version": version,
        "base": {
            "path_or_id": str(base),
            "fingerprint": fingerprint or base_fingerprint(str(base)),
        },
        "created": datetime.now(UTC).isoformat(),
        "hyperparameters": {"rank": rank, "alpha": 2 * rank, "seed": seed},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="session")
def adapters_root(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapters root with `alpha` (versions 1 and 2) and `beta` (version 1), random weights."""

    def build(root: Path) -> None:
        write_random_adapter(tiny_base, root, "alpha", 1, seed=1)
        write_random_adapter(tiny_base, root, "alpha", 2, seed=2)
        write_random_adapter(tiny_base, root, "beta", 1, seed=3, rank=4)

    return built_once(tmp_path_factory, "adapters", build)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA, a server certificate for localhost/127.0.0.1 it signed, a client
    certificate it signed, and a client certificate from an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _issue_cert(directory: Path, name: str, subject: str, issuer_key, issuer_name, *,
                is_ca: bool = False, server: bool = False):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(subject_name)
               .issuer_name(issuer_name or subject_name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(days=1))
               .not_valid_after(now + timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not is_ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key, cert_path, key_path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway PKI made at test time (nothing secret is committed)."""
    d = tmp_path_factory.mktemp("tls")
    ca, ca_key, ca_path, _ = _issue_cert(d, "ca", "switchboard test CA", None, None, is_ca=True)
    _, _, server_cert, server_key = _issue_cert(d, "server", "localhost", ca_key, ca.subject,
                                                server=True)
    _, _, client_cert, client_key = _issue_cert(d, "client", "test client", ca_key, ca.subject)
    other, other_key, _, _ = _issue_cert(d, "other-ca", "unrelated CA", None, None, is_ca=True)
    _, _, stranger_cert, stranger_key = _issue_cert(d, "stranger", "stranger", other_key,
                                                    other.subject)
    return TlsFiles(ca_path, server_cert, server_key, client_cert, client_key, stranger_cert,
                    stranger_key)


# Stubs over a test module's own `server` fixture (each module starts the server it needs).

@pytest.fixture(scope="module")
def channel(server):
    import grpc

    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def infer(channel):
    from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

    return pb_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
def admin(channel):
    from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

    return pb_grpc.AdapterServiceStub(channel)


@pytest.fixture(scope="module")
def sessions(channel):
    from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

    return pb_grpc.SessionServiceStub(channel)


@pytest.fixture
def run_bench(monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """`run_bench("bench_engine", argv, **options)`: a bench script's `main(argv, **options)`
    run in this process (which must return 0) and what it printed. Its imports (torch,
    transformers) are loaded here already, where a subprocess would spend about 5 s of CPU
    loading them again; torch's thread count, which the scripts set, is restored after."""
    import contextlib
    import importlib
    import io

    import torch

    # The scripts import their siblings by name, as they do when run from bench/.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))

    def run(script: str, argv: list[str], **options: Any) -> str:
        module = importlib.import_module(script)
        threads = torch.get_num_threads()
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                code = module.main(argv, **options)
        finally:
            torch.set_num_threads(threads)
        assert code == 0, printed.getvalue()[-3000:]
        return printed.getvalue()

    return run


SERVER_START_TIMEOUT_S = 120.0


def free_port() -> int:
    """A loopback TCP port free right now (for a metrics or HTTP port that cannot be 0)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_ZYGOTE = Zygote()


def forked_server(argv: list[str], log: Path, env: dict[str, str] | None = None
                  ) -> ForkedProcess:
    """`python -m server.cli ARGV` forked from this test process's zygote, output to `log`, in
    `env` (this process's environment by default)."""
    return _ZYGOTE.spawn(argv, log, env=env)


def forked_trainer(argv: list[str], out: Path, err: Path, env: dict[str, str]) -> ForkedProcess:
    """`python -m trainer.cli ARGV` in `env`, forked from the zygote; stdout to `out`, stderr
    to `err`."""
    return _ZYGOTE.spawn(argv, out, module="trainer.cli", env=env, err=err)


class ServerProcess:
    """`python -m server.cli serve` in its own process on port 0, its output appended to `log`;
    `wait_serving` reads the port from its "ready on" line, written once health is SERVING. The
    process is forked from a zygote that has the heavy imports done (tests/server_zygote.py);
    test_app's CLI test starts the real executable."""

    def __init__(self, base: Path, adapters: Path, db: Path, log: Path,
                 grace: float = 1.0, extra: tuple[str, ...] = ()) -> None:
        self.log = log
        self.offset = log.stat().st_size if log.exists() else 0
        self.port = 0
        argv = ["serve", "--base", str(base), "--adapters-root", str(adapters), "--port", "0",
                "--device", "cpu", "--sessions-db", str(db), "--shutdown-grace-seconds",
                str(grace), *extra]
        self.process = _ZYGOTE.spawn(argv, log)
        self._client = self._channel = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def text(self) -> str:
        """This process's part of the log."""
        return self.log.read_text(errors="replace")[self.offset:]

    def wait_serving(self) -> ServerProcess:
        import re
        import time

        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(r"ready on [^ ]+:(\d+)", self.text())
            if found:
                self.port = int(found.group(1))
                return self
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.text()}")
            time.sleep(0.1)
        pytest.fail(f"server not ready after {SERVER_START_TIMEOUT_S}s:\n{self.text()}")

    @property
    def client(self):
        """A SwitchboardClient without retries (made on first use)."""
        if self._client is None:
            from clients.client import SwitchboardClient

            self._client = SwitchboardClient(self.target, retries=0)
        return self._client

    @property
    def channel(self):
        """A plain gRPC channel (made on first use)."""
        if self._channel is None:
            import grpc

            self._channel = grpc.insecure_channel(self.target)
        return self._channel

    def kill(self, sig: int) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def ensure_dead(self) -> None:
        for connection in (self._client, self._channel):
            if connection is not None:
                connection.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)


def head_lines(src: Path, dst: Path, n: int) -> Path:
    """`dst` holding the first `n` lines of `src` (a small training file)."""
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dst


def run_trainer(argv: list[str]) -> tuple[int, str]:
    """`trainer ARGV` in-process: its exit code and what it printed."""
    import contextlib
    import io

    from trainer.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


class SessionChatter(threading.Thread):
    """Short turns on its own session until the server goes away; `acked` is the conversation
    as far as the client saw answers complete, `error` what ended it."""

    def __init__(self, target: str, session: str) -> None:
        from clients.client import SwitchboardClient

        super().__init__(daemon=True)
        self.client = SwitchboardClient(target, retries=0)
        self.session = session
        self.acked: list[dict[str, str]] = []
        self.error: Exception | None = None

    @property
    def turns(self) -> int:
        return len(self.acked) // 2

    def run(self) -> None:
        from clients.errors import SwitchboardRpcError

        try:
            while True:
                message = {"role": "user", "content": f"{self.session} turn {self.turns}"}
                result = self.client.chat([message], max_new_tokens=4, session_id=self.session,
                                          timeout=60)
                # One assignment, so a reader on another thread never sees half a turn.
                self.acked = [*self.acked, message, {"role": "assistant", "content": result.text}]
        except SwitchboardRpcError as err:
            self.error = err  # expected: the server was killed
        finally:
            self.client.close()
