"""Server settings: one validated dataclass read once in `main` and passed down to every part."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from server.keys import KeySources
from server.session_stores.backend import SessionsURL, parse_sessions_url

DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("nf4", "none")
MIN_KEY_CHARS = 16
TRUNCATION_STRATEGIES = ("error", "drop_oldest", "sliding_window", "middle_out", "summarize")


def _require(condition: bool, field: str, value: object, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{field} must be {allowed}, got {value!r}")


@dataclass
class ServerConfig:
    """Everything `switchboard-server serve` can be told; checks ranges and combinations."""

    base: str
    adapters_root: Path
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    # How the base's weights are held: 4-bit NF4 (the default, for memory), or "none" (the
    # compute dtype: float32 on the CPU, where NF4 dequantization on every step is the slow part).
    quantize: str = "nf4"
    max_batch: int = 16
    max_loaded_adapters: int = 8
    max_queue: int = 256
    max_lora_rank: int = 64
    # 0 means the model's own context length (max_position_embeddings). The engine keeps a KV
    # cache of max_batch x context_length tokens, allocated at start.
    context_length: int = 0
    # Prompt tokens one engine step may prefill, and the longest prefill forward (in columns).
    max_prefill_tokens: int = 4096
    prefill_chunk_tokens: int = 512
    # Decode steps replayed as CUDA graphs: None = on for CUDA, off on the CPU.
    cuda_graphs: bool | None = None
    default_max_new_tokens: int = 128
    # Upper bound a request may ask for; larger values are refused with INVALID_ARGUMENT.
    max_new_tokens_limit: int = 4096
    default_truncation: str = "drop_oldest"
    # None disables server-side sessions (requests carrying a session id are then refused).
    sessions_db: Path | None = None
    # A store URL (server/session_stores/backend.py: a path, sqlite:PATH, redis://...); when set
    # it replaces sessions_db. Replicas share sessions through a Redis URL.
    sessions_url: str = ""
    # How long a replica's hold on a session outlives the replica if it dies (Redis store only).
    session_lease_seconds: float = 30.0
    session_ttl_seconds: float = 7 * 24 * 3600.0
    max_sessions: int = 10_000
    # 0 turns the Prometheus endpoint off.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # The OpenAI-compatible HTTP port (server/openai) on `host`; 0 turns it off.
    http_port: int = 0
    log_json: bool = False
    # Adapter reference used by the summarize strategy; "" means the bare base.
    summarize_adapter: str = ""
    # Seconds in-flight RPCs get to finish on shutdown.
    shutdown_grace_seconds: float = 5.0

    # Security. No keys at all means no authentication (loopback development); any key turns it
    # on for every service but health and reflection. Admin keys may also chat and score.
    # repr=False: a config printed in a log or traceback must not carry the keys.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    # Key files, read at start and again on SIGHUP (server/keys.py): plain lists of API / admin
    # keys, and the TOML tenants file (names, adapter scopes, limits). The keys above, from the
    # environment or the caller, stay for the life of the process.
    api_keys_file: Path | None = None
    admin_keys_file: Path | None = None
    keys_file: Path | None = None
    # Append-only JSON lines of admin actions (server/audit.py); None = no audit trail.
    audit_log: Path | None = None
    # PEM files; cert + key turn TLS on, client_ca additionally requires client certificates
    # signed by that CA (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    # Limits, each answered with a precise status when passed.
    max_request_bytes: int = 4 * 1024 * 1024
    max_messages: int = 1000
    max_message_chars: int = 200_000
    # 0 means only the context budget (context length - max_new_tokens) bounds the prompt.
    max_prompt_tokens: int = 0
    max_concurrent_requests: int = 512
    max_concurrent_per_adapter: int = 256
    # Largest adapter_model.safetensors the server will read.
    max_adapter_bytes: int = 1024 * 1024 * 1024
    # Bytes all loaded adapters may take together; 0 = bounded only by max_loaded_adapters.
    adapter_memory_budget_bytes: int = 0

    def __post_init__(self) -> None:
        self.adapters_root = Path(self.adapters_root)
        if self.sessions_db is not None:
            self.sessions_db = Path(self.sessions_db)
        _require(bool(str(self.base).strip()), "base", self.base, "a model directory or hub id")
        _require(self.host != "", "host", self.host, "a host name or address")
        _require(0 <= self.port <= 65535, "port", self.port, "in 0..65535 (0 picks a free one)")
        _require(self.device in DEVICES, "device", self.device, f"one of {DEVICES}")
        _require(self.quantize in QUANTIZATIONS, "quantize", self.quantize,
                 f"one of {QUANTIZATIONS}")
        self._check_positive("max_batch", "max_loaded_adapters", "max_queue", "max_lora_rank",
                             "default_max_new_tokens", "max_new_tokens_limit", "max_sessions",
                             "max_prefill_tokens", "prefill_chunk_tokens")
        _require(self.cuda_graphs in (None, True, False), "cuda_graphs", self.cuda_graphs,
                 "true, false or None (on for CUDA only)")
        _require(not (self.cuda_graphs and self.device == "cpu"), "cuda_graphs",
                 self.cuda_graphs, "off with device cpu (CUDA graphs need a GPU)")
        _require(self.context_length >= 0, "context_length", self.context_length,
                 ">= 0 (0 = the model's own)")
        _require(self.default_max_new_tokens <= self.max_new_tokens_limit,
                 "default_max_new_tokens", self.default_max_new_tokens,
                 f"<= max_new_tokens_limit ({self.max_new_tokens_limit})")
        if self.context_length:
            _require(self.default_max_new_tokens < self.context_length, "default_max_new_tokens",
                     self.default_max_new_tokens, f"< context_length ({self.context_length})")
        _require(self.default_truncation in TRUNCATION_STRATEGIES, "default_truncation",
                 self.default_truncation, f"one of {TRUNCATION_STRATEGIES}")
        self._check_sessions_url()
        _require(math.isfinite(self.session_ttl_seconds) and self.session_ttl_seconds > 0,
                 "session_ttl_seconds", self.session_ttl_seconds, "a positive number of seconds")
        _require(0 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port,
                 "in 0..65535 (0 = off)")
        _require(self.metrics_port == 0 or self.metrics_port != self.port, "metrics_port",
                 self.metrics_port, f"different from port ({self.port})")
        _require(0 <= self.http_port <= 65535, "http_port", self.http_port,
                 "in 0..65535 (0 = off)")
        _require(self.http_port == 0 or self.http_port not in (self.port, self.metrics_port),
                 "http_port", self.http_port,
                 f"different from port ({self.port}) and metrics_port ({self.metrics_port})")
        _require(self.shutdown_grace_seconds >= 0, "shutdown_grace_seconds",
                 self.shutdown_grace_seconds, ">= 0")
        self._check_security()
        self._check_positive("max_request_bytes", "max_messages", "max_message_chars",
                             "max_concurrent_requests", "max_concurrent_per_adapter",
                             "max_adapter_bytes")
        for name in ("max_prompt_tokens", "adapter_memory_budget_bytes"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, name, value, ">= 0 (0 = no limit)")
        _require(self.max_concurrent_per_adapter <= self.max_concurrent_requests,
                 "max_concurrent_per_adapter", self.max_concurrent_per_adapter,
                 f"<= max_concurrent_requests ({self.max_concurrent_requests})")

    def _check_security(self) -> None:
        self.api_keys = tuple(self.api_keys)
        self.admin_keys = tuple(self.admin_keys)
        for name in ("api_keys", "admin_keys"):
            for key in getattr(self, name):
                # The key itself never goes into a message: messages reach logs.
                _require(isinstance(key, str) and len(key) >= MIN_KEY_CHARS
                         and key.isprintable() and not any(c.isspace() for c in key),
                         name, f"<a key of {len(key) if isinstance(key, str) else '?'} chars>",
                         f"printable keys of at least {MIN_KEY_CHARS} characters, no spaces")
        _require(not set(self.api_keys) & set(self.admin_keys), "admin_keys", "<redacted>",
                 "different from every api key (a key has one kind)")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "api_keys_file", "admin_keys_file",
                     "keys_file", "audit_log"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        _require((self.tls_cert is None) == (self.tls_key is None), "tls_cert/tls_key",
                 (self.tls_cert, self.tls_key), "given together (both PEM files) or not at all")
        _require(self.tls_client_ca is None or self.tls_cert is not None, "tls_client_ca",
                 self.tls_client_ca, "used with tls_cert and tls_key (mutual TLS needs TLS)")

    def _check_sessions_url(self) -> None:
        if self.sessions_url:
            try:
                parse_sessions_url(self.sessions_url)
            except ValueError as e:
                raise ValueError(f"sessions_url: {e}") from None
        _require(math.isfinite(self.session_lease_seconds) and self.session_lease_seconds >= 1,
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

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, value, "a positive integer")

    @property
    def address(self) -> str:
        """The host:port string grpc binds; IPv6 literals get brackets."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"
