"""Process wiring: bind the grpc.aio server, load the base, start the engine, serve, shut down.

Health reports NOT_SERVING from the moment the port is bound until the base is loaded, then
SERVING for "" and every service. The port is plaintext or TLS (mutual TLS with a client CA);
auth (server/auth.py) is installed when keys are configured. Shutdown (SIGTERM, SIGINT or `stop`)
drains: health turns NOT_SERVING, the gate (server/drain.py) refuses new calls with UNAVAILABLE
while running ones get up to the grace period, then the rest are cancelled, the engine stops and
the session store is closed. `start_in_thread` runs the same `serve` on a private loop for tests
and benchmarks.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from common.modeling import LoadOptions, base_fingerprint, load_base, resolve_device
from server.adapters import AdapterRegistry
from server.api import SERVICE_NAMES, add_servicers
from server.auth import AuthInterceptor, KeyRing
from server.config import ServerConfig
from server.context import PromptRenderer
from server.drain import DrainGate
from server.engine import Engine, EngineConfig
from server.service import InferenceCore, Limits, Runtime

log = logging.getLogger(__name__)

SESSION_PURGE_INTERVAL_S = 600.0
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass
class Started:
    """Reported once the server listens and the base is loaded."""

    port: int
    metrics_port: int


@dataclass
class _Components:
    """Things `serve` must close on the way out."""

    engine: Any = None
    metrics: Any = None
    sessions: Any = None
    closers: list[Callable[[], None]] = field(default_factory=list)


def _context_length(model: Any, config: ServerConfig) -> int:
    native = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if config.context_length and native:
        return min(config.context_length, native)
    return config.context_length or native or 2048


def _engine_config(config: ServerConfig) -> EngineConfig:
    return EngineConfig(
        max_batch=config.max_batch, max_queue=config.max_queue,
        max_loaded_adapters=config.max_loaded_adapters, max_lora_rank=config.max_lora_rank,
        default_max_new_tokens=config.default_max_new_tokens,
        max_adapter_bytes=config.max_adapter_bytes,
        adapter_memory_budget_bytes=config.adapter_memory_budget_bytes,
    )


def _make_metrics(config: ServerConfig, parts: _Components) -> int:
    """Create the Prometheus metrics when a port is configured; returns the bound port or 0."""
    if not config.metrics_port:
        return 0
    from server.metrics import Metrics

    parts.metrics = Metrics()
    parts.metrics.set_capacity(config.max_queue, config.max_batch, config.max_loaded_adapters)
    port = parts.metrics.start_http(config.metrics_port, config.metrics_host)
    parts.closers.append(parts.metrics.stop_http)
    log.info("metrics on http://%s:%d/metrics", config.metrics_host, port)
    return port


def _make_sessions(config: ServerConfig, parts: _Components) -> None:
    if config.sessions_db is None:
        return
    from server.sessions import SQLiteSessionStore

    parts.sessions = SQLiteSessionStore(config.sessions_db, ttl_seconds=config.session_ttl_seconds,
                                        max_sessions=config.max_sessions)
    close = getattr(parts.sessions, "close", None)
    if close is not None:
        parts.closers.append(close)


def _load(config: ServerConfig, parts: _Components) -> InferenceCore:
    """Blocking: load the base, start the engine, scan adapters (runs in a worker thread)."""
    # Cheap checks first, so a typo in a path fails before minutes of model loading.
    fingerprint = base_fingerprint(config.base)
    registry = AdapterRegistry(config.adapters_root, fingerprint, base_id=config.base)
    _make_sessions(config, parts)
    started = time.monotonic()
    model, tokenizer = load_base(config.base, LoadOptions(device=config.device))
    log.info("loaded base %s (%s) in %.2fs", config.base, fingerprint, time.monotonic() - started)
    parts.engine = Engine(model, tokenizer, _engine_config(config), observer=parts.metrics)
    parts.engine.start()
    if parts.metrics is not None:
        parts.metrics.set_info(_version(), config.base, resolve_device(config.device))
        parts.metrics.set_base_memory(int(model.get_memory_footprint()))
        if parts.sessions is not None:
            parts.metrics.set_sessions(parts.sessions.count())
    limits = Limits(context_length=_context_length(model, config), vocab_size=len(tokenizer))
    return InferenceCore(engine=parts.engine, tokenizer=tokenizer,
                         renderer=PromptRenderer(tokenizer), registry=registry,
                         config=config, limits=limits, metrics=parts.metrics,
                         sessions=parts.sessions)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("switchboard")
    except PackageNotFoundError:
        return "0+unknown"


async def _set_health(health: HealthServicer, status: int) -> None:
    for name in ("", HEALTH_SERVICE, *SERVICE_NAMES):
        await health.set(name, status)


def _read_pem(path: Path, what: str) -> bytes:
    """A PEM file's bytes, or a start-up error that names the file and what it was for."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path}: {e.strerror or e}") from e
    if b"-----BEGIN " not in data:
        raise ValueError(f"the {what} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    assert config.tls_cert is not None and config.tls_key is not None
    pair = (_read_pem(config.tls_key, "TLS key (--tls-key)"),
            _read_pem(config.tls_cert, "TLS certificate (--tls-cert)"))
    client_ca = None if config.tls_client_ca is None else _read_pem(
        config.tls_client_ca, "client CA (--tls-client-ca)")
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def _bind(server: grpc.aio.Server, config: ServerConfig,
          credentials: grpc.ServerCredentials | None) -> int:
    if credentials is None:
        port = server.add_insecure_port(config.address)
    else:
        try:
            port = server.add_secure_port(config.address, credentials)
        except RuntimeError as e:  # grpc says only "failed to bind", also for a bad key pair
            raise ValueError(f"cannot serve TLS on {config.address} with {config.tls_cert} and "
                             f"{config.tls_key}: {e} (is the address free, and are they a "
                             "matching certificate and key?)") from e
    if port == 0:
        raise OSError(f"cannot bind {config.address}")
    return port


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _security_summary(config: ServerConfig) -> str:
    """What protects the port, for the start-up log; counts keys, never shows them."""
    if not config.tls_enabled:
        tls = "TLS off (plaintext)"
    elif config.tls_client_ca is None:
        tls = "TLS on"
    else:
        tls = "mutual TLS on (client certificates required)"
    if not config.auth_enabled:
        return f"{tls}, auth off (no keys configured)"
    return (f"{tls}, auth on ({len(config.api_keys)} API keys, "
            f"{len(config.admin_keys)} admin keys)")


def _build_server(config: ServerConfig, runtime: Runtime, health: HealthServicer,
                  gate: DrainGate) -> grpc.aio.Server:
    # Auth runs first, so refused callers are neither counted by the gate nor told its state.
    interceptors: list[grpc.aio.ServerInterceptor] = [gate]
    if config.auth_enabled:
        interceptors.insert(0, AuthInterceptor(KeyRing.of(config.api_keys, config.admin_keys)))
    # grpc itself answers RESOURCE_EXHAUSTED for a request over the limit, before decoding it.
    options = [("grpc.max_receive_message_length", config.max_request_bytes)]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    add_servicers(server, runtime)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    return server


async def _listen(config: ServerConfig, runtime: Runtime, health: HealthServicer,
                  gate: DrainGate) -> tuple[grpc.aio.Server, int]:
    """Build, bind and start the server. The PEM files are read before any grpc server exists,
    and a server that cannot bind is stopped before the error leaves: a grpc.aio server left
    unstopped crashes the interpreter when it is collected after its loop has closed."""
    credentials = _server_credentials(config) if config.tls_enabled else None
    server = _build_server(config, runtime, health, gate)
    try:
        port = _bind(server, config, credentials)
    except BaseException:
        await server.stop(None)
        raise
    await server.start()
    return server, port


async def serve(config: ServerConfig, *, stop: asyncio.Event | None = None,
                on_started: Callable[[Started], None] | None = None) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM when run on the main thread)."""
    stop = stop or _signal_event()
    parts = _Components()
    runtime = Runtime(config)
    health = HealthServicer()
    gate = DrainGate(exempt=frozenset({HEALTH_SERVICE}))
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    server, port = await _listen(config, runtime, health, gate)
    log.info("listening on %s:%d (health NOT_SERVING until the base is loaded); %s",
             config.host, port, _security_summary(config))
    if not config.auth_enabled and not _is_loopback(config.host):
        log.warning("no API keys configured and %s is not a loopback address: anyone who can "
                    "reach port %d may chat, load adapters and read sessions "
                    "(see --api-keys-file / --admin-keys-file)", config.host, port)
    try:
        metrics_port = _make_metrics(config, parts)
        started = time.monotonic()
        runtime.core = await asyncio.to_thread(_load, config, parts)
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
        log.info("ready on %s:%d after %.2fs (SERVING)", config.host, port,
                 time.monotonic() - started)
        if on_started is not None:
            on_started(Started(port, metrics_port))
        janitor = asyncio.create_task(_purge_sessions(parts.sessions))
        await stop.wait()
        janitor.cancel()
    finally:
        await _shutdown(server, health, gate, parts, config.shutdown_grace_seconds)


async def _purge_sessions(store: Any) -> None:
    """Delete expired sessions now and then (they already read as absent; this frees space)."""
    while store is not None:
        try:
            purged = await asyncio.to_thread(store.purge_expired)
            if purged:
                log.info("purged %d expired sessions", purged)
        except Exception:  # noqa: BLE001 - housekeeping must never take the server down
            log.exception("purging expired sessions failed")
        await asyncio.sleep(SESSION_PURGE_INTERVAL_S)


async def _shutdown(server: grpc.aio.Server, health: HealthServicer, gate: DrainGate,
                    parts: _Components, grace: float) -> None:
    gate.begin()
    await health.enter_graceful_shutdown()
    log.info("shutting down: health NOT_SERVING, new calls refused, %d in flight get %.1fs",
             gate.in_flight, grace)
    if await gate.drained(grace):
        log.info("every call in flight finished")
    else:
        log.warning("%d calls still running after the %.1fs grace; cancelling them",
                    gate.in_flight, grace)
    await server.stop(0)
    if parts.engine is not None:
        await asyncio.to_thread(parts.engine.shutdown)
    for close in reversed(parts.closers):
        close()
    log.info("stopped")


def _signal_event() -> asyncio.Event:
    event = asyncio.Event()
    if threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, event.set)
    return event


@dataclass
class RunningServer:
    """A server running on its own thread and loop; `stop()` shuts it down gracefully."""

    port: int
    metrics_port: int
    _stop: Callable[[], None]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stop()


def start_in_thread(config: ServerConfig, timeout: float = 300.0) -> RunningServer:
    """Start `serve(config)` on a daemon thread; return once it is SERVING (or raise its error)."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        state["loop"] = loop
        stop = asyncio.Event()
        state["stop"] = stop

        def started(info: Started) -> None:
            state["started"] = info
            ready.set()

        try:
            loop.run_until_complete(serve(config, stop=stop, on_started=started))
        except BaseException as e:  # handed to the caller below
            state["error"] = e
        finally:
            ready.set()
            loop.close()

    thread = threading.Thread(target=run, name="switchboard-server", daemon=True)
    thread.start()
    if not ready.wait(timeout) or "started" not in state:
        raise RuntimeError(f"server did not start: {state.get('error', 'timed out')!r}") \
            from state.get("error")

    def stop() -> None:
        if thread.is_alive():
            state["loop"].call_soon_threadsafe(state["stop"].set)
            thread.join(timeout=config.shutdown_grace_seconds + 60)

    info: Started = state["started"]
    return RunningServer(info.port, info.metrics_port, stop)


def serve_forever(config: ServerConfig) -> None:
    """Blocking entry point for the CLI."""
    asyncio.run(serve(config))


__all__ = ["RunningServer", "Started", "serve", "serve_forever", "start_in_thread"]
