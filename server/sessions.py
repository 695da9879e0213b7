"""Server-side sessions: the `SessionStore` interface, its SQLite implementation, and per-session
exclusivity (`SessionLocks`).

A session is a conversation the server keeps for the client, who then sends only the new message.
The server appends a turn (the new user message(s) and the answer) only when the answer completes,
in one transaction, so a session never holds half a turn. The store also keeps the summary cache
of the `summarize` strategy (server/context.py `SummaryCache.to_dict()`).

`SQLiteSessionStore` keeps everything in one file in WAL mode with `synchronous=FULL`: a turn
whose `append_turn` returned is on disk and survives a `kill -9` or a power cut. One connection
behind a lock serves all threads (the gRPC front calls it through `asyncio.to_thread`); SQLite
serializes writers anyway and a turn is a few small rows. The schema is versioned with
`PRAGMA user_version`; a file from a newer Switchboard is refused rather than misread.

Storage failures (disk full, I/O error, the file locked by another process past the busy
timeout) raise `SessionStoreError` (UNAVAILABLE at the edge) saying what was not stored; the
transaction is rolled back, so the session stays as it was, and the server keeps serving
stateless calls. Errors that mean a bug in this module (IntegrityError, ProgrammingError)
propagate unchanged. A database that cannot be opened fails startup naming the path.

Several replicas need a shared store instead (PostgreSQL or Redis) behind the same protocol; a
replica-wide lock then replaces `SessionLocks` (see docs/scale-out.md).

Ownership: every session records the key id (server/keys.py) of the key that created it, its
`owner`; "" means no one, which is what sessions made before owners existed get (schema 2
migration) and what sessions made without authentication get: only admin keys see those. The
store only records and filters by owner (`list`, `delete`); who may see what is decided by the
chat pipeline and the session admin (server/core/).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from common.conversation import Message
from server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    SessionBusyError,
    SessionStoreError,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
# How long a write waits for another process's lock on the file before it fails. One server owns
# its file, so this only matters when something else (a backup, the sqlite3 shell) holds it; a
# request should fail with a clear status rather than hang.
DEFAULT_BUSY_TIMEOUT_S = 5.0
# sqlite3 errors that mean our own code is wrong, not that storage failed: they stay unwrapped.
_BUG_ERRORS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)

_SCHEMA_V1 = (
    """CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        turns INTEGER NOT NULL DEFAULT 0,
        summary TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX sessions_by_updated ON sessions(updated)",
    """CREATE TABLE messages (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        turn INTEGER NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID""",
)
# Version 2: the owning key id; existing sessions get "" (no one: admin-only).
_SCHEMA_V2 = (
    "ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
    "CREATE INDEX sessions_by_owner ON sessions(owner, updated)",
)
# Migrations from version N-1 to N, applied in order inside one transaction.
_MIGRATIONS: dict[int, tuple[str, ...]] = {1: _SCHEMA_V1, 2: _SCHEMA_V2}
# `owner` argument meaning "whoever owns it" (an admin's view).
ANY_OWNER = None


def validate_session_id(session_id: str) -> str:
    """The id itself, or InvalidArgumentError: 1-128 characters of [A-Za-z0-9._:@-]."""
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise InvalidArgumentError(
            f"session id must be 1-128 characters of letters, digits and . _ : @ - starting with "
            f"a letter or digit, got {session_id!r}")
    return session_id


def validate_turn(session_id: str, new_messages: Sequence[Message]) -> None:
    """What every store checks before it appends a turn: the id, and a turn that says something."""
    validate_session_id(session_id)
    if not new_messages:
        raise InvalidArgumentError("a turn needs at least one message")


@dataclass(frozen=True)
class SessionInfo:
    id: str
    created: float  # Unix seconds
    updated: float
    turns: int
    message_count: int
    owner: str = ""  # key id of the creator; "" = no one (admin-only)


@dataclass(frozen=True)
class Session:
    id: str
    messages: list[Message]
    summary_cache: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    turns: int = 0
    owner: str = ""


class SessionStore(Protocol):
    """What the server needs from a session store. Every method is blocking and thread-safe;
    times are Unix seconds. Expired sessions behave as absent.

    Owners (schema 2): `Session.owner` / `SessionInfo.owner` carry the creator's key id ("" =
    no one). `append_turn` sets it when it creates the session and never changes it; `list`
    and `delete` take `owner` (ANY_OWNER = None: every owner) and act only on that owner's
    sessions, so a listing's limit counts that owner's sessions only."""

    def get(self, session_id: str) -> Session | None: ...

    def append_turn(self, session_id: str, new_messages: Sequence[Message],
                    summary_cache: dict[str, Any] | None = None,
                    owner: str = "") -> SessionInfo:
        """Append one turn atomically (all its messages, and the summary cache if given, or
        nothing), creating the session (owned by `owner`) if needed; may evict the least
        recently updated sessions past the store's cap."""
        ...

    def list(self, limit: int = 100, owner: str | None = ANY_OWNER) -> list[SessionInfo]:
        """The most recently updated sessions (of `owner`) first."""
        ...

    def delete(self, session_id: str, owner: str | None = ANY_OWNER) -> bool:
        """Delete the session if it exists (and belongs to `owner`)."""
        ...

    def count(self) -> int: ...

    def purge_expired(self, now: float | None = None) -> int:
        """Delete sessions idle past the time-to-live; returns how many went."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SessionSettings:
    ttl_seconds: float = 0.0  # 0 = sessions never expire
    max_sessions: int = 0  # 0 = no cap; past it the least recently updated session is removed
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S  # wait for another process's lock, then fail

    def __post_init__(self) -> None:
        if self.ttl_seconds < 0:
            raise ValueError(f"ttl_seconds must be >= 0 (0 = no expiry), got {self.ttl_seconds}")
        if self.max_sessions < 0:
            raise ValueError(f"max_sessions must be >= 0 (0 = no cap), got {self.max_sessions}")
        if not (math.isfinite(self.busy_timeout_s) and self.busy_timeout_s >= 0):
            raise ValueError(f"busy_timeout_s must be a finite number of seconds >= 0, got "
                             f"{self.busy_timeout_s}")


class SQLiteSessionStore:
    """`SessionStore` in one SQLite file (WAL, synchronous=FULL), shared by threads via a lock."""

    def __init__(self, path: str | Path, ttl_seconds: float = 0.0, max_sessions: int = 0, *,
                 clock: Callable[[], float] = time.time,
                 busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.settings = SessionSettings(ttl_seconds, max_sessions, busy_timeout_s)
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = self._connect()
        try:
            self._configure()
            self._migrate()
        except FailedPreconditionError:
            self._db.close()
            raise
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise FailedPreconditionError(f"cannot open session database {self.path}: {e}") from e

    def _connect(self) -> sqlite3.Connection:
        """Open the file (creating missing parent directories), or FailedPreconditionError
        naming the path and why it is unusable."""
        try:
            if self.path.is_dir():
                raise IsADirectoryError(f"{self.path} is a directory, not a database file")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write transaction
            # holds the write lock from its start and a turn commits as one unit.
            return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self.settings.busy_timeout_s)
        except (OSError, sqlite3.Error) as e:
            raise FailedPreconditionError(
                f"cannot open session database {self.path}: {e}; give --sessions-db a file path "
                f"in a writable directory") from e

    def _configure(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.DatabaseError(f"journal_mode WAL refused (got {mode})")
        self._db.execute("PRAGMA synchronous=FULL")  # a turn acknowledged is a turn on disk
        self._db.execute("PRAGMA foreign_keys=ON")

    def _migrate(self) -> None:
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FailedPreconditionError(
                    f"session database {self.path} has schema version {version}; this server "
                    f"understands up to {SCHEMA_VERSION}")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target]:
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self, write: bool = True) -> Any:
        """One transaction under the lock: IMMEDIATE takes the write lock up front, a read gets
        a consistent snapshot across its statements. Any failure, COMMIT's included, rolls back."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        # After some failures (disk full, I/O error) SQLite has already rolled back itself.
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    @contextlib.contextmanager
    def _writing(self, not_done: str) -> Any:
        """A write transaction whose storage failure becomes SessionStoreError; `not_done` tells
        the caller what did not happen."""
        try:
            with self._transaction() as db:
                yield db
        except _BUG_ERRORS:
            raise
        except sqlite3.Error as e:
            raise self._failure("written", e, not_done) from e

    @contextlib.contextmanager
    def _reading(self) -> Any:
        try:
            with self._transaction(write=False) as db:
                yield db
        except _BUG_ERRORS:
            raise
        except sqlite3.Error as e:
            raise self._failure("read", e, "no session data was returned or changed") from e

    def _failure(self, verb: str, error: sqlite3.Error, not_done: str) -> SessionStoreError:
        # The path goes to the server log only: the message reaches API clients.
        log.error("session store %s could not be %s: %s", self.path, verb, error)
        return SessionStoreError(f"the session store could not be {verb} ({error}); {not_done}")

    def _cutoff(self, now: float) -> float:
        """Sessions updated before this instant have expired (-inf when nothing expires)."""
        ttl = self.settings.ttl_seconds
        return now - ttl if ttl else float("-inf")

    def _info(self, db: sqlite3.Connection, session_id: str) -> SessionInfo | None:
        row = db.execute(
            "SELECT s.id, s.created, s.updated, s.turns, "
            "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id), s.owner "
            "FROM sessions s WHERE s.id = ? AND s.updated >= ?",
            (session_id, self._cutoff(self._clock()))).fetchone()
        return SessionInfo(*row) if row else None

    def get(self, session_id: str) -> Session | None:
        with self._reading() as db:
            row = db.execute(
                "SELECT created, updated, turns, summary, owner FROM sessions WHERE id = ? "
                "AND updated >= ?", (session_id, self._cutoff(self._clock()))).fetchone()
            if row is None:
                return None
            messages = [Message(role, content) for role, content in db.execute(
                "SELECT role, content FROM messages WHERE session_id = ? ORDER BY seq",
                (session_id,))]
        created, updated, turns, summary, owner = row
        return Session(session_id, messages, json.loads(summary), created, updated, turns, owner)

    def _create_or_revive(self, db: sqlite3.Connection, session_id: str, now: float,
                          owner: str) -> bool:
        """Create the session (owned by `owner`) if absent; an expired one is replaced by an
        empty one. Returns whether a session was created."""
        db.execute("DELETE FROM sessions WHERE id = ? AND updated < ?",
                   (session_id, self._cutoff(now)))
        created = db.execute(
            "INSERT INTO sessions (id, created, updated, owner) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO NOTHING", (session_id, now, now, owner)).rowcount == 1
        if created:
            self._enforce_cap(db, keep=session_id)
        return created

    def _enforce_cap(self, db: sqlite3.Connection, keep: str) -> None:
        cap = self.settings.max_sessions
        if cap:
            db.execute(
                "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions WHERE id != ? "
                "ORDER BY updated DESC LIMIT -1 OFFSET ?)", (keep, cap - 1))

    def append_turn(self, session_id: str, new_messages: Sequence[Message],
                    summary_cache: dict[str, Any] | None = None,
                    owner: str = "") -> SessionInfo:
        validate_turn(session_id, new_messages)
        not_done = (f"the answer was not stored: session {session_id!r} keeps its earlier turns "
                    "without this one; send the turn again later")
        with self._writing(not_done) as db:
            now = self._clock()
            self._create_or_revive(db, session_id, now, owner)
            seq, turn = db.execute(
                "SELECT COALESCE(MAX(seq), -1) + 1, (SELECT turns FROM sessions WHERE id = ?) "
                "FROM messages WHERE session_id = ?", (session_id, session_id)).fetchone()
            db.executemany(
                "INSERT INTO messages (session_id, seq, turn, role, content) VALUES (?,?,?,?,?)",
                [(session_id, seq + i, turn, m.role, m.content)
                 for i, m in enumerate(new_messages)])
            db.execute("UPDATE sessions SET updated = MAX(updated, ?), turns = turns + 1 "
                       "WHERE id = ?", (now, session_id))
            if summary_cache is not None:
                db.execute("UPDATE sessions SET summary = ? WHERE id = ?",
                           (json.dumps(summary_cache), session_id))
            info = self._info(db, session_id)
        assert info is not None
        return info

    def list(self, limit: int = 100, owner: str | None = ANY_OWNER) -> list[SessionInfo]:
        if limit <= 0:
            raise InvalidArgumentError(f"limit must be positive, got {limit}")
        with self._reading() as db:
            rows = db.execute(
                "SELECT s.id, s.created, s.updated, s.turns, "
                "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id), s.owner "
                "FROM sessions s WHERE s.updated >= ? AND (? IS NULL OR s.owner = ?) "
                "ORDER BY s.updated DESC, s.id LIMIT ?",
                (self._cutoff(self._clock()), owner, owner, limit)).fetchall()
        return [SessionInfo(*row) for row in rows]

    def delete(self, session_id: str, owner: str | None = ANY_OWNER) -> bool:
        with self._writing(f"session {session_id!r} was not deleted") as db:
            return db.execute("DELETE FROM sessions WHERE id = ? AND (? IS NULL OR owner = ?)",
                              (session_id, owner, owner)).rowcount == 1

    def count(self) -> int:
        with self._reading() as db:
            return db.execute("SELECT COUNT(*) FROM sessions WHERE updated >= ?",
                              (self._cutoff(self._clock()),)).fetchone()[0]

    def purge_expired(self, now: float | None = None) -> int:
        if not self.settings.ttl_seconds:
            return 0
        cutoff = self._cutoff(self._clock() if now is None else now)
        with self._writing("no expired session was deleted") as db:
            return db.execute("DELETE FROM sessions WHERE updated < ?", (cutoff,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SessionLocks:
    """One request at a time per session, for one asyncio event loop.

    `acquire(id)` fails fast by default: a second request on a busy session gets SessionBusyError
    (ABORTED at the edge, gRPC's code for a concurrency conflict the client may retry), because
    queueing it would build its prompt from a history that is about to change under it. A caller
    may instead wait up to `wait_s` seconds for the session to free up.
    """

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    def __len__(self) -> int:
        """Sessions with a holder or a waiter (entries are removed when the last one leaves)."""
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def acquire(self, session_id: str, wait_s: float = 0.0) -> AsyncIterator[None]:
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        self._users[session_id] = self._users.get(session_id, 0) + 1
        try:
            await self._take(lock, session_id, wait_s)
            try:
                yield
            finally:
                lock.release()
        finally:
            self._users[session_id] -= 1
            if not self._users[session_id]:
                del self._users[session_id], self._locks[session_id]

    @staticmethod
    async def _take(lock: asyncio.Lock, session_id: str, wait_s: float) -> None:
        busy = SessionBusyError(f"session {session_id!r} is busy with another request; retry "
                                f"when it completes")
        if lock.locked() and wait_s <= 0:
            raise busy
        try:
            await asyncio.wait_for(lock.acquire(), wait_s if wait_s > 0 else None)
        except TimeoutError:
            raise busy from None
