"""Session store backends chosen by URL: SQLite (one replica) or Redis (shared by replicas)."""

from server.session_stores.backend import (
    SessionBackend,
    SessionsURL,
    open_sessions,
    parse_sessions_url,
)

__all__ = ["SessionBackend", "SessionsURL", "open_sessions", "parse_sessions_url"]
