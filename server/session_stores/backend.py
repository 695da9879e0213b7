"""Which session store a server uses, chosen by one URL (`--sessions`), and its matching lock.

- a file path, or `sqlite:PATH` (`sqlite:///var/lib/switchboard/sessions.db`): the SQLite store
  of server/sessions.py with the in-process `SessionLocks` (one replica);
- `redis://[:PASSWORD@]HOST:PORT/DB`, `rediss://...` (TLS) or `unix:///PATH/redis.sock`: the
  Redis store with `RedisSessionLocks` (any number of replicas sharing that Redis). The query
  parameter `prefix` (default `switchboard:`) namespaces the keys, so several deployments can
  share one Redis; every other query parameter goes to the redis client (`socket_timeout=2`).

`parse_sessions_url` is pure (config validation calls it); `open_sessions` connects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from server.sessions import SessionLocks, SessionSettings, SQLiteSessionStore

REDIS_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PREFIX = "switchboard:"
# A request must fail with UNAVAILABLE rather than hang when Redis stops answering.
DEFAULT_SOCKET_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SessionsURL:
    """A parsed `--sessions` value: a SQLite path, or a Redis URL and key prefix."""

    kind: str  # "sqlite" or "redis"
    sqlite_path: Path | None = None
    redis_url: str = ""
    prefix: str = DEFAULT_PREFIX

    @property
    def display(self) -> str:
        """The location without any password, for logs and messages."""
        if self.kind == "sqlite":
            return str(self.sqlite_path)
        parts = urlsplit(self.redis_url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_sessions_url(value: str) -> SessionsURL:
    """The store a `--sessions` value names, or ValueError saying what is accepted."""
    value = value.strip()
    if not value:
        raise ValueError("sessions must be a SQLite file path, sqlite:PATH or redis://HOST:PORT/DB"
                         ", got ''")
    scheme = urlsplit(value).scheme if "://" in value or value.startswith("sqlite:") else ""
    if scheme == "" or len(scheme) == 1:  # a plain path (a Windows drive letter is no scheme)
        return SessionsURL("sqlite", sqlite_path=Path(value))
    if scheme == "sqlite":
        path = value[len("sqlite:"):]
        path = path[2:] if path.startswith("//") else path
        if not path:
            raise ValueError(f"sessions URL {value!r} names no file: use sqlite:///PATH")
        return SessionsURL("sqlite", sqlite_path=Path(path))
    if scheme in REDIS_SCHEMES:
        return _redis(value)
    raise ValueError(f"sessions URL scheme {scheme!r} is not supported: use a SQLite file path, "
                     f"sqlite:PATH or one of {', '.join(s + '://' for s in REDIS_SCHEMES)}")


def _redis(value: str) -> SessionsURL:
    parts = urlsplit(value)
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"sessions URL {value!r} names no host: use redis://HOST:PORT/DB")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError as e:
        raise ValueError(f"sessions URL {value!r} has a bad port: {e}") from None
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [v for k, v in query if k == "prefix"]
    prefix = prefixes[-1] if prefixes else DEFAULT_PREFIX
    if not prefix or any(c.isspace() for c in prefix):
        raise ValueError(f"sessions URL prefix must be non-empty without spaces, got {prefix!r}")
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return SessionsURL("redis", redis_url=urlunsplit(parts._replace(query=rest)), prefix=prefix)


@dataclass(frozen=True)
class SessionBackend:
    """A store and the lock that keeps one request at a time per session where it is shared."""

    store: Any  # a server.sessions.SessionStore
    locks: Any  # SessionLocks or RedisSessionLocks: the same `acquire(session_id, wait_s)`


def open_sessions(url: SessionsURL, settings: SessionSettings, lease_seconds: float, *,
                  clock: Callable[[], float] = time.time) -> SessionBackend:
    """Open the store `url` names; FailedPreconditionError naming it when it is unusable.
    `clock` (Unix seconds) decides expiry; tests pass a fake one."""
    if url.kind == "sqlite":
        assert url.sqlite_path is not None
        store = SQLiteSessionStore(url.sqlite_path, ttl_seconds=settings.ttl_seconds,
                                   max_sessions=settings.max_sessions,
                                   busy_timeout_s=settings.busy_timeout_s, clock=clock)
        return SessionBackend(store, SessionLocks())
    import redis

    from server.session_stores.redis_locks import RedisSessionLocks
    from server.session_stores.redis_store import RedisSessionStore

    client = redis.Redis.from_url(url.redis_url, decode_responses=True,
                                  socket_timeout=DEFAULT_SOCKET_TIMEOUT_S,
                                  socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT_S)
    store = RedisSessionStore(client, url.prefix, settings.ttl_seconds, settings.max_sessions,
                              clock=clock, name=url.display)
    return SessionBackend(store, RedisSessionLocks(client, url.prefix, lease_seconds))
