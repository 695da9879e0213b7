"""Process wiring: bind the grpc.aio server, load the base, start the engine, serve, shut down.

Health reports NOT_SERVING from the moment the port is bound until the base is loaded, then
SERVING for "" and every service. The port is plaintext or TLS (mutual TLS with a client CA);
auth (server/auth.py) is installed when keys are configured. Shutdown (SIGTERM, SIGINT or `stop`)
drains: health turns NOT_SERVING, the gate (server/drain.py) refuses new calls with UNAVAILABLE
while running ones get up to the grace period, then the rest are cancelled, the engine stops and
the session store is closed. `start_in_thread` runs the same `serve` on a private loop for tests
and benchmarks. With --http-port, the OpenAI-compatible HTTP front (server/openai) serves on the
same loop over the same runtime, and drains with the gRPC port.

SIGHUP re-reads the key files (server/keys.py) and swaps the key ring whole: removed keys are
refused from the next call on, new ones accepted, calls in flight are not disturbed; a file
that does not parse keeps the keys in force and logs why. Each reload joins the audit trail.
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
from server.audit import OK, AuditLog, entry
from server.auth import AuthInterceptor, KeyRing, LiveKeys
from server.config import ServerConfig
from server.context import PromptRenderer
from server.core import Executors, InferenceCore, Limits
from server.drain import DrainGate
from server.engine import Engine
from server.interceptor import CallInterceptor
from server.runtime import Runtime
from server.sessions import SessionLocks

log = logging.getLogger(__name__)

SESSION_PURGE_INTERVAL_S = 600.0
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICES = (reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection")


@dataclass
class Started:
    """Reported once the server listens and the base is loaded."""

    port: int
    metrics_port: int
    http_port: int = 0


@dataclass
class _Components:
    """Things `serve` must close on the way out."""

    engine: Any = None
    metrics: Any = None
    sessions: Any = None
    session_locks: Any = None  # None without sessions (a fresh, unused SessionLocks then)
    http: Any = None  # the OpenAI-compatible HTTP front (server/openai), with --http-port
    closers: list[Callable[[], None]] = field(default_factory=list)


def _engine_summary(engine: Engine) -> str:
    """The engine's shape for the ready line: KV cache size, CUDA graph capture time and, on
    the CPU, the threads timed for each forward size."""
    kv = engine.runner.kv
    graphs = ("CUDA graphs off" if engine.graph_capture_seconds is None
              else f"CUDA graphs captured in {engine.graph_capture_seconds:.1f}s")
    plan = engine.thread_plan
    threads = "" if plan is None else f", {plan.describe()} (timed in {plan.seconds:.1f}s)"
    return (f"KV cache {kv.max_rows} rows x {kv.capacity} tokens "
            f"({kv.bytes / 2**20:.0f} MiB), {graphs}{threads}")


def _make_metrics(config: ServerConfig, parts: _Components) -> int:
    """Create the Prometheus metrics when a port is configured; returns the bound port or 0."""
    if not config.metrics_port:
        return 0
    from server.metrics import Metrics

    parts.metrics = Metrics()
    engine = config.engine
    parts.metrics.set_capacity(engine.scheduler.max_queue, engine.scheduler.max_batch,
                               engine.cache.max_loaded_adapters)
    port = parts.metrics.start_http(config.metrics_port, config.metrics_host)
    parts.closers.append(parts.metrics.stop_http)
    log.info("metrics on http://%s:%d/metrics", config.metrics_host, port)
    return port


def _make_sessions(config: ServerConfig, parts: _Components) -> None:
    location = config.sessions_location
    if location is None:
        return
    from server.session_stores import open_sessions
    from server.sessions import SessionSettings

    backend = open_sessions(location, SessionSettings(config.session_ttl_seconds,
                                                      config.max_sessions),
                            config.session_lease_seconds)
    parts.sessions, parts.session_locks = backend.store, backend.locks
    log.info("sessions in %s (%s)", location.display, location.kind)
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
    model, tokenizer = load_base(config.base,
                                 LoadOptions(device=config.device, quantize=config.quantize))
    log.info("loaded base %s (%s) in %.2fs", config.base, fingerprint, time.monotonic() - started)
    parts.engine = Engine(model, tokenizer, config.engine, observer=parts.metrics)
    parts.engine.start()
    if parts.metrics is not None:
        parts.metrics.set_info(_version(), config.base, resolve_device(config.device))
        parts.metrics.set_base_memory(int(model.get_memory_footprint()))
        if parts.sessions is not None:
            parts.metrics.set_sessions(parts.sessions.count())
    limits = Limits(context_length=parts.engine.max_context, vocab_size=len(tokenizer))
    executors = Executors(config.chat_workers, config.slow_workers)
    parts.closers.append(executors.close)
    return InferenceCore(engine=parts.engine, renderer=PromptRenderer(tokenizer),
                         registry=registry, config=config, limits=limits,
                         sessions=parts.sessions,
                         session_locks=(SessionLocks() if parts.session_locks is None
                                        else parts.session_locks),
                         executors=executors)


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


def _security_summary(config: ServerConfig, keys: LiveKeys | None) -> str:
    """What protects the port, for the start-up log; counts keys, never shows them."""
    if not config.tls_enabled:
        tls = "TLS off (plaintext)"
    elif config.tls_client_ca is None:
        tls = "TLS on"
    else:
        tls = "mutual TLS on (client certificates required)"
    if keys is None:
        return f"{tls}, auth off (no keys configured)"
    callers = keys.ring.callers
    admins = sum(c.is_admin for c in callers)
    scoped = sum(c.scoped for c in callers)
    return (f"{tls}, auth on ({len(callers) - admins} API keys of which {scoped} scoped, "
            f"{admins} admin keys)")


def _build_server(config: ServerConfig, runtime: Runtime, health: HealthServicer,
                  gate: DrainGate) -> grpc.aio.Server:
    # Auth runs first, so refused callers are neither counted by the gate nor told its state;
    # the calls the gate admits get their request id, status code and metrics from the last.
    edge = CallInterceptor(lambda: runtime.metrics, config.adapters_root,
                           exempt=frozenset({HEALTH_SERVICE, *REFLECTION_SERVICES}))
    interceptors: list[grpc.aio.ServerInterceptor] = [gate, edge]
    if runtime.keys is not None:
        interceptors.insert(0, AuthInterceptor(runtime.keys))
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
    runtime = _runtime(config, parts)
    health = HealthServicer()
    gate = DrainGate(exempt=frozenset({HEALTH_SERVICE}))
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    server, port = await _listen(config, runtime, health, gate)
    log.info("listening on %s:%d (health NOT_SERVING until the base is loaded); %s",
             config.host, port, _security_summary(config, runtime.keys))
    if not config.auth_enabled and not _is_loopback(config.host):
        log.warning("no API keys configured and %s is not a loopback address: anyone who can "
                    "reach port %d may chat, load adapters and read sessions "
                    "(see --api-keys-file / --admin-keys-file)", config.host, port)
    try:
        metrics_port = _make_metrics(config, parts)
        runtime.metrics = parts.metrics
        http_port = await _start_http(config, runtime, parts)
        started = time.monotonic()
        runtime.core = await asyncio.to_thread(_load, config, parts)
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
        log.info("ready on %s:%d after %.2fs (SERVING); %s", config.host, port,
                 time.monotonic() - started, _engine_summary(runtime.core.engine))
        if on_started is not None:
            on_started(Started(port, metrics_port, http_port))
        janitor = asyncio.create_task(_purge_sessions(parts.sessions))
        _on_sighup(lambda: asyncio.ensure_future(reload_keys(config, runtime)))
        await stop.wait()
        janitor.cancel()
    finally:
        await _shutdown(server, health, gate, parts, config.shutdown_grace_seconds)


async def _start_http(config: ServerConfig, runtime: Runtime, parts: _Components) -> int:
    """The OpenAI-compatible HTTP front on this loop, over the same runtime; its port or 0."""
    if not config.http_port:
        return 0
    from server.openai import HttpFront

    front = HttpFront(config, runtime)
    port = await front.start()
    parts.http = front
    log.info("OpenAI-compatible HTTP on %s://%s:%d/v1 (same keys, limits and metrics)",
             "https" if config.tls_enabled else "http", config.host, port)
    return port


def _runtime(config: ServerConfig, parts: _Components) -> Runtime:
    """The key ring (when auth is on) and the audit trail (when asked for), before any port."""
    keys = LiveKeys(KeyRing(config.key_sources.load())) if config.auth_enabled else None
    audit = None
    if config.audit_log is not None:
        audit = AuditLog(config.audit_log)
        parts.closers.append(audit.close)
    return Runtime(config, keys, audit)


async def reload_keys(config: ServerConfig, runtime: Runtime) -> bool:
    """Re-read the key files and put the new ring in force; a bad file keeps the old keys (and
    says why in the log and the audit trail). Returns whether the new keys are in force."""
    if runtime.keys is None:
        log.warning("SIGHUP: authentication is off (no keys configured); nothing to reload")
        return False
    try:
        ring = KeyRing(await asyncio.to_thread(config.key_sources.load))
    except ValueError as e:
        log.error("key reload failed, the %d keys in force stay: %s", len(runtime.keys.ring), e)
        await _audit(runtime, entry(None, "keys.reload", "key files", "INVALID_ARGUMENT", str(e)))
        return False
    previous = runtime.keys.swap(ring)
    if runtime.core is not None:
        runtime.core.limiter.retain(c.key_id for c in ring.callers)
    old, new = {c.key_id for c in previous.callers}, {c.key_id for c in ring.callers}
    summary = f"{len(new)} keys: {len(new - old)} added, {len(old - new)} removed"
    log.info("keys reloaded: %s", summary)
    await _audit(runtime, entry(None, "keys.reload", "key files", OK, summary))
    return True


async def _audit(runtime: Runtime, item: Any) -> None:
    if runtime.audit is not None:
        await asyncio.to_thread(runtime.audit.record, item)


def _on_sighup(reload: Callable[[], Any]) -> None:
    """Reload keys on SIGHUP; signal handlers exist only on the main thread's loop."""
    if threading.current_thread() is threading.main_thread():
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)


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
    fronts: list[Any] = [gate] if parts.http is None else [gate, parts.http]
    if parts.http is not None:
        parts.http.begin()
    await health.enter_graceful_shutdown()
    log.info("shutting down: health NOT_SERVING, new calls refused, %d in flight get %.1fs",
             sum(f.in_flight for f in fronts), grace)
    if all(await asyncio.gather(*(f.drained(grace) for f in fronts))):
        log.info("every call in flight finished")
    else:
        log.warning("%d calls still running after the %.1fs grace; cancelling them",
                    sum(f.in_flight for f in fronts), grace)
    await server.stop(0)
    if parts.http is not None:
        await parts.http.stop()
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
    http_port: int = 0

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
    return RunningServer(info.port, info.metrics_port, stop, info.http_port)


def serve_forever(config: ServerConfig) -> None:
    """Blocking entry point for the CLI."""
    asyncio.run(serve(config))


__all__ = ["RunningServer", "Started", "serve", "serve_forever", "start_in_thread"]
