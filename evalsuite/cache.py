"""The replay cache: one SQLite file under --out, one row per replayed conversation.

A row's key hashes everything that decides the answers: the adapter version that actually ran
("name@version", or "__base__"), the conversation's content hash, the replay mode and the sampling
settings. A run that is interrupted resumes where it stopped; a second run with the same settings
replays nothing. Rows are written as each conversation finishes, in autocommit mode, so a crash
loses at most the conversations in flight.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Bumped when the stored result layout changes, so stale rows are never misread.
SCHEMA_VERSION = 1


def cache_key(adapter: str, conversation_hash: str, mode: str, sampling: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of the arguments (the idea of lm-eval's `hash_args`)."""
    payload = {
        "schema": SCHEMA_VERSION,
        "adapter": adapter,
        "conversation": conversation_hash,
        "mode": mode,
        "sampling": dict(sampling),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResultCache:
    """A key-value store of JSON results; safe to share between the threads of one process."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS results ("
            " key TEXT PRIMARY KEY, adapter TEXT NOT NULL, conversation TEXT NOT NULL,"
            " mode TEXT NOT NULL, value TEXT NOT NULL)"
        )
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM results WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
        return json.loads(row[0])

    def put(
        self, key: str, value: Mapping[str, Any], *, adapter: str, conversation: str, mode: str
    ) -> None:
        blob = json.dumps(value, sort_keys=True, ensure_ascii=False)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO results (key, adapter, conversation, mode, value)"
                " VALUES (?, ?, ?, ?, ?)",
                (key, adapter, conversation, mode, blob),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
