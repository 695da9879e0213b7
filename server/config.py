"""Server settings: one tree of validated dataclasses, read once in `main` and passed down.

`ServerConfig` holds the serving edge's settings and an `engine: EngineConfig`
(server/engine_config.py), which holds the `scheduler: SchedulerConfig` and adapter `cache:
AdapterCacheConfig` sections; the engine gets its section, the scheduler its own. Each field is
written once, with its default, help and checks; server/cli.py generates the flags from these
fields (common/settings.py). Neither module loads torch: the CLI parses flags and sets thread
policies before torch is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import settings
from common.names import TRUNCATION_STRATEGIES, TruncationStrategy
from common.settings import require, require_non_negative, require_positive, section, setting
from server.engine_config import (
    EngineConfig,
)
from server.keys import KeySources
from server.session_stores.backend import SessionsURL, parse_sessions_url

DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("nf4", "none")
MIN_KEY_CHARS = 16
SECURITY, SESSIONS, LIMITS, OBSERVABILITY = "security", "sessions", "limits", "observability"


@dataclass
class ServerConfig:
    """Everything `switchboard-server serve` can be told; checks ranges and combinations."""

    base: str = setting(help="base model directory or hub id")
    adapters_root: Path = setting(
        help="directory holding <name>/<version>/ adapters and aliases.json")
    host: str = setting("127.0.0.1", "address to bind")
    port: int = setting(50051, "port to bind, 0 picks a free one")
    device: str = setting("auto", "where the base model runs", choices=DEVICES)
    # NF4 saves memory; on the CPU its dequantization on every step is the slow part, so a small
    # base there is faster held in the compute dtype.
    quantize: str = setting(
        "nf4", "the base's weights: nf4 (4-bit) or none (bf16 on a GPU, float32 on the CPU)",
        choices=QUANTIZATIONS)
    engine: EngineConfig = section(EngineConfig, "engine")
    default_truncation: TruncationStrategy = setting(
        TruncationStrategy.DROP_OLDEST, "how a conversation over its token budget is fitted")
    # The summarize strategy's writer; "" is the bare base.
    summarize_adapter: str = setting(
        "", "adapter writing summaries for the summarize strategy ('' = the bare base)")
    # Seconds in-flight RPCs get to finish on shutdown.
    shutdown_grace_seconds: float = setting(5.0, "seconds in-flight calls get on shutdown")
    # Two pools apart from asyncio's default, so a slow adapter load never delays a chat.
    chat_workers: int = setting(
        8, "threads for chats' short blocking steps (tokenize, fit, session store)")
    slow_workers: int = setting(
        4, "threads for long waits: adapter loads, summaries, scores")

    # None disables server-side sessions (requests carrying a session id are then refused).
    sessions_db: Path | None = setting(
        Path("switchboard-sessions.db"), "SQLite file for server-side sessions", group=SESSIONS)
    # A store URL (server/session_stores/backend.py: a path, sqlite:PATH, redis://...); when set
    # it replaces sessions_db. Replicas share sessions through a Redis URL.
    sessions_url: str = setting(
        "", "session store: a SQLite path, sqlite:PATH or redis://HOST:PORT/DB (replicas share "
            "a Redis); replaces --sessions-db", flag="--sessions", metavar="URL", group=SESSIONS)
    session_lease_seconds: float = setting(
        30.0, "Redis store: how long a dead replica's hold on a session lasts", group=SESSIONS)
    session_ttl_seconds: float = setting(
        7 * 24 * 3600.0, "seconds an unused session is kept", group=SESSIONS)
    max_sessions: int = setting(10_000, "sessions kept; the oldest go first", group=SESSIONS)

    metrics_port: int = setting(0, "Prometheus /metrics port; 0 = off", group=OBSERVABILITY)
    metrics_host: str = setting("127.0.0.1", "address the metrics port binds",
                                group=OBSERVABILITY)
    http_port: int = setting(
        0, "OpenAI-compatible HTTP port (POST /v1/chat/completions, GET /v1/models) on --host; "
           "0 = off", group=OBSERVABILITY)
    log_json: bool = setting(False, "log JSON lines", group=OBSERVABILITY)

    # No keys at all means no authentication (loopback development); any key turns it on for
    # every service but health and reflection. Admin keys may also chat and score. The keys come
    # from the environment or the caller and stay for the life of the process; repr=False: a
    # config printed in a log or traceback must not carry them.
    api_keys: tuple[str, ...] = setting((), cli=False, repr=False)
    admin_keys: tuple[str, ...] = setting((), cli=False, repr=False)
    # Read at start and again on SIGHUP (server/keys.py).
    api_keys_file: Path | None = setting(None, "keys allowed to chat and score", group=SECURITY)
    admin_keys_file: Path | None = setting(
        None, "keys allowed to administer adapters, aliases and sessions (and to chat)",
        group=SECURITY)
    keys_file: Path | None = setting(
        None, "TOML tenants file: [[keys]] with name, key (or sha256), kind, adapters (scope) "
              "and limits (see docs/security.md)", group=SECURITY)
    audit_log: Path | None = setting(
        None, "append-only JSON lines of admin actions (switchboard audit FILE)", group=SECURITY)
    # cert + key turn TLS on; client_ca additionally requires client certificates it signed.
    tls_cert: Path | None = setting(None, "server certificate chain (PEM)", group=SECURITY)
    tls_key: Path | None = setting(None, "server private key (PEM)", group=SECURITY)
    tls_client_ca: Path | None = setting(
        None, "CA (PEM) that client certificates must chain to: mutual TLS", group=SECURITY)

    # Each limit, when passed, is answered with a precise status.
    max_new_tokens_limit: int = setting(
        4096, "largest max_new_tokens a request may ask for", group=LIMITS)
    max_request_bytes: int = setting(4 * 1024 * 1024, "largest request message", group=LIMITS)
    max_messages: int = setting(1000, "messages per request", group=LIMITS)
    max_message_chars: int = setting(200_000, "characters per message", group=LIMITS)
    max_prompt_tokens: int = setting(
        0, "prompt token budget; 0 = context length - max_new_tokens", group=LIMITS)
    max_concurrent_requests: int = setting(512, "running + waiting, in total", group=LIMITS)
    max_concurrent_per_adapter: int = setting(256, "running + waiting per adapter", group=LIMITS)

    @classmethod
    def build(cls, **flat: Any) -> ServerConfig:
        """The whole tree from flat setting names (`base=..., max_batch=4, port=0`)."""
        return settings.build(cls, **flat)

    def __post_init__(self) -> None:
        self.adapters_root = Path(self.adapters_root)
        if self.sessions_db is not None:
            self.sessions_db = Path(self.sessions_db)
        require(bool(str(self.base).strip()), "base", self.base, "a model directory or hub id")
        require(self.host != "", "host", self.host, "a host name or address")
        require(0 <= self.port <= 65535, "port", self.port, "in 0..65535 (0 picks a free one)")
        require(self.device in DEVICES, "device", self.device, f"one of {DEVICES}")
        require(self.quantize in QUANTIZATIONS, "quantize", self.quantize,
                f"one of {QUANTIZATIONS}")
        require(isinstance(self.engine, EngineConfig), "engine", self.engine, "an EngineConfig")
        require(not (self.engine.cuda_graphs and self.device == "cpu"), "cuda_graphs",
                self.engine.cuda_graphs, "off with device cpu (CUDA graphs need a GPU)")
        require(not (self.engine.tune_cpu_threads and self.device == "cuda"), "tune_cpu_threads",
                self.engine.tune_cpu_threads, "off with device cuda (it times CPU forwards)")
        require(self.default_truncation in TRUNCATION_STRATEGIES, "default_truncation",
                self.default_truncation, f"one of {TRUNCATION_STRATEGIES}")
        self.default_truncation = TruncationStrategy(self.default_truncation)
        self._check_sessions()
        self._check_ports()
        require(self.shutdown_grace_seconds >= 0, "shutdown_grace_seconds",
                self.shutdown_grace_seconds, ">= 0")
        self._check_security()
        self._check_limits()

    def _check_ports(self) -> None:
        require(0 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port,
                "in 0..65535 (0 = off)")
        require(self.metrics_port == 0 or self.metrics_port != self.port, "metrics_port",
                self.metrics_port, f"different from port ({self.port})")
        require(0 <= self.http_port <= 65535, "http_port", self.http_port,
                "in 0..65535 (0 = off)")
        require(self.http_port == 0 or self.http_port not in (self.port, self.metrics_port),
                "http_port", self.http_port,
                f"different from port ({self.port}) and metrics_port ({self.metrics_port})")

    def _check_limits(self) -> None:
        require_positive(self, "chat_workers", "slow_workers")
        require_positive(self, "max_new_tokens_limit", "max_request_bytes", "max_messages",
                         "max_message_chars", "max_concurrent_requests",
                         "max_concurrent_per_adapter")
        require_non_negative(self, "max_prompt_tokens")
        require(self.engine.default_max_new_tokens <= self.max_new_tokens_limit,
                "default_max_new_tokens", self.engine.default_max_new_tokens,
                f"<= max_new_tokens_limit ({self.max_new_tokens_limit})")
        require(self.max_concurrent_per_adapter <= self.max_concurrent_requests,
                "max_concurrent_per_adapter", self.max_concurrent_per_adapter,
                f"<= max_concurrent_requests ({self.max_concurrent_requests})")

    def _check_security(self) -> None:
        self.api_keys = tuple(self.api_keys)
        self.admin_keys = tuple(self.admin_keys)
        for name in ("api_keys", "admin_keys"):
            for key in getattr(self, name):
                # The key itself never goes into a message: messages reach logs.
                require(isinstance(key, str) and len(key) >= MIN_KEY_CHARS
                        and key.isprintable() and not any(c.isspace() for c in key),
                        name, f"<a key of {len(key) if isinstance(key, str) else '?'} chars>",
                        f"printable keys of at least {MIN_KEY_CHARS} characters, no spaces")
        require(not set(self.api_keys) & set(self.admin_keys), "admin_keys", "<redacted>",
                "different from every api key (a key has one kind)")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "api_keys_file", "admin_keys_file",
                     "keys_file", "audit_log"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        require((self.tls_cert is None) == (self.tls_key is None), "tls_cert/tls_key",
                (self.tls_cert, self.tls_key), "given together (both PEM files) or not at all")
        require(self.tls_client_ca is None or self.tls_cert is not None, "tls_client_ca",
                self.tls_client_ca, "used with tls_cert and tls_key (mutual TLS needs TLS)")

    def _check_sessions(self) -> None:
        require_positive(self, "max_sessions")
        require(math.isfinite(self.session_ttl_seconds) and self.session_ttl_seconds > 0,
                "session_ttl_seconds", self.session_ttl_seconds, "a positive number of seconds")
        if self.sessions_url:
            try:
                parse_sessions_url(self.sessions_url)
            except ValueError as e:
                raise ValueError(f"sessions_url: {e}") from None
        require(math.isfinite(self.session_lease_seconds) and self.session_lease_seconds >= 1,
                "session_lease_seconds", self.session_lease_seconds, "a number of seconds >= 1")

    @property
    def sessions_location(self) -> SessionsURL | None:
        """The session store to open, None when sessions are disabled."""
        if self.sessions_url:
            return parse_sessions_url(self.sessions_url)
        return None if self.sessions_db is None else SessionsURL("sqlite", self.sessions_db)

    @property
    def auth_enabled(self) -> bool:
        """Any key, or any key file (even an empty one: its keys may come with a reload)."""
        return self.key_sources.any

    @property
    def key_sources(self) -> KeySources:
        return KeySources(self.api_keys, self.admin_keys, self.api_keys_file,
                          self.admin_keys_file, self.keys_file)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    @property
    def address(self) -> str:
        """The host:port string grpc binds; IPv6 literals get brackets."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"
