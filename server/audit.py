"""The audit trail: one JSON line per admin action, appended to a file and never rewritten.

Recorded: adapter loads and unloads, alias moves, session deletes and key reloads, each with
who did it (the key's name and id, or "SIGHUP" for a reload), what (action and target), when
(UTC, ISO 8601) and the outcome ("OK" or the gRPC status name of the refusal, with its message).
A line is written with one `write` on a file opened in append mode and flushed to disk before
the action is answered, so concurrent writers never interleave and a crash loses at most the
line being written. `switchboard audit FILE` prints the trail. Keys never appear in it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from server.keys import Caller

log = logging.getLogger(__name__)

OK = "OK"
SYSTEM = "SIGHUP"
MAX_DETAIL_CHARS = 500


@dataclass(frozen=True)
class AuditEntry:
    """One line of the trail."""

    time: str
    who: str
    key_id: str
    action: str
    target: str
    outcome: str
    detail: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)


def entry(who: Caller | None, action: str, target: str, outcome: str,
          detail: str = "") -> AuditEntry:
    """An entry stamped now; `who` None is the server itself (a signal)."""
    return AuditEntry(time=datetime.now(UTC).isoformat(timespec="milliseconds"),
                      who=SYSTEM if who is None else who.name,
                      key_id="" if who is None else who.key_id, action=action, target=target,
                      outcome=outcome, detail=detail[:MAX_DETAIL_CHARS])


class AuditLog:
    """Appends entries to `path` (created with its directory, mode 0600 when new)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            raise ValueError(f"cannot open the audit log {self.path} (--audit-log): "
                             f"{e.strerror or e}") from e
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def record(self, item: AuditEntry) -> None:
        """Blocking (call it from a worker thread): append and fsync one line. A failing disk
        is logged, not raised: the action itself already happened."""
        line = item.to_json() + "\n"
        with self._lock:
            try:
                self._file.write(line)
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as e:
                log.error("audit log %s could not be written (%s); lost entry: %s",
                          self.path, e, line.strip())

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_entries(path: str | Path) -> list[AuditEntry]:
    """Every entry of a trail, oldest first (for tests and tools on the server's machine)."""
    with Path(path).open(encoding="utf-8") as handle:
        return [AuditEntry(**json.loads(line)) for line in handle if line.strip()]


__all__ = ["OK", "SYSTEM", "AuditEntry", "AuditLog", "entry", "read_entries"]
