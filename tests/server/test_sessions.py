"""The SQLite session store (real files, real threads, a real SIGKILL) and per-session locks."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.conversation import Message
from server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    SessionBusyError,
    SessionStoreError,
    UnavailableError,
)
from server.sessions import (
    SCHEMA_VERSION,
    SessionLocks,
    SessionStore,
    SQLiteSessionStore,
)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def turn(i: int) -> list[Message]:
    return [Message("user", f"question {i} 😀"), Message("assistant", f"answer {i} 日本")]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock):
    s = SQLiteSessionStore(tmp_path / "sessions.db", clock=clock)
    yield s
    s.close()


def test_it_implements_the_protocol(store):
    assert isinstance(store, SQLiteSessionStore)
    typed: SessionStore = store  # a static check as much as a runtime one
    assert typed.count() == 0


def test_turns_round_trip_in_order(store, clock):
    assert store.get("s1") is None
    store.append_turn("s1", turn(0))
    clock.now += 5
    info = store.append_turn("s1", [Message("system", "be brief"), *turn(1)])
    assert (info.turns, info.message_count, info.updated - info.created) == (2, 5, 5)
    session = store.get("s1")
    assert session.messages == [*turn(0), Message("system", "be brief"), *turn(1)]
    assert (session.turns, session.created, session.updated) == (2, 1_000_000.0, 1_000_005.0)
    assert session.summary_cache == {}


@pytest.mark.parametrize("bad", ["", " x", "a/b", "x" * 129, "ünï", "-leading"])
def test_session_ids_are_validated(store, bad):
    with pytest.raises(InvalidArgumentError, match="session id"):
        store.append_turn(bad, turn(0))


def test_an_empty_turn_is_refused(store):
    with pytest.raises(InvalidArgumentError, match="at least one message"):
        store.append_turn("s", [])


def test_summary_cache_is_stored_with_its_turn(store):
    store.append_turn("s", turn(0), summary_cache={"covered": 2, "digest": "ab", "summary": "sum"})
    assert store.get("s").summary_cache == {"covered": 2, "digest": "ab", "summary": "sum"}
    store.append_turn("s", turn(1))  # no new summary: the stored one stays
    assert store.get("s").summary_cache["covered"] == 2
    store.append_turn("s", turn(2), summary_cache={"covered": 4})  # in the turn's transaction
    assert store.get("s").summary_cache == {"covered": 4}


def test_list_count_and_delete(store, clock):
    for i in range(5):
        clock.now += 1
        store.append_turn(f"s{i}", turn(i))
    clock.now += 1
    store.append_turn("s1", turn(9))
    assert [info.id for info in store.list(limit=3)] == ["s1", "s4", "s3"]
    assert store.count() == 5
    assert store.delete("s1") is True and store.delete("s1") is False
    assert store.get("s1") is None and store.count() == 4
    with pytest.raises(InvalidArgumentError):
        store.list(limit=0)
    orphans = sqlite3.connect(store.path).execute(
        "SELECT COUNT(*) FROM messages WHERE session_id = 's1'").fetchone()[0]
    assert orphans == 0


def test_sessions_expire_after_their_ttl(tmp_path, clock):
    store = SQLiteSessionStore(tmp_path / "ttl.db", ttl_seconds=60, clock=clock)
    store.append_turn("old", turn(0))
    clock.now += 30
    store.append_turn("new", turn(0))
    clock.now += 45  # "old" idle 75 s, "new" 45 s
    assert store.get("old") is None and store.get("new") is not None
    assert store.count() == 1 and [i.id for i in store.list()] == ["new"]
    assert store.purge_expired() == 1
    assert store.purge_expired(now=clock.now + 3600) == 1
    store.append_turn("new", turn(1))  # expired, so the turn starts a fresh session
    assert store.get("new").messages == turn(1)
    store.close()


def test_max_sessions_evicts_the_least_recently_updated(tmp_path, clock):
    store = SQLiteSessionStore(tmp_path / "cap.db", max_sessions=2, clock=clock)
    for name in ("a", "b"):
        clock.now += 1
        store.append_turn(name, turn(0))
    clock.now += 1
    store.append_turn("a", turn(1))  # "b" is now the least recently updated
    clock.now += 1
    store.append_turn("c", turn(0))
    assert sorted(i.id for i in store.list()) == ["a", "c"] and store.count() == 2
    store.close()


def test_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="ttl_seconds"):
        SQLiteSessionStore(tmp_path / "x.db", ttl_seconds=-1)
    with pytest.raises(ValueError, match="max_sessions"):
        SQLiteSessionStore(tmp_path / "x.db", max_sessions=-2)
    with pytest.raises(ValueError, match="busy_timeout_s"):
        SQLiteSessionStore(tmp_path / "x.db", busy_timeout_s=float("nan"))


def test_reopen_keeps_everything_and_the_file_is_durable(tmp_path):
    path = tmp_path / "sub" / "s.db"
    first = SQLiteSessionStore(path)
    first.append_turn("s", turn(0))
    assert first._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert first._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    first.close()
    second = SQLiteSessionStore(path)
    assert second.get("s").messages == turn(0)
    assert second._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    second.close()


def test_newer_schema_and_garbage_are_refused(tmp_path):
    newer = tmp_path / "newer.db"
    sqlite3.connect(newer).execute("PRAGMA user_version=99").connection.close()
    with pytest.raises(FailedPreconditionError, match="schema version 99"):
        SQLiteSessionStore(newer)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(FailedPreconditionError, match="cannot open session database"):
        SQLiteSessionStore(garbage)


def test_a_failing_turn_leaves_the_session_as_it_was(store):
    store.append_turn("s", turn(0))
    broken = [Message("user", "kept?"), Message("assistant", None)]  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError):
        store.append_turn("s", broken)
    session = store.get("s")
    assert session.messages == turn(0) and session.turns == 1


def test_many_threads_never_interleave_a_turn(store):
    def writer(w: int) -> None:
        for i in range(15):
            store.append_turn("shared", [Message("user", f"{w}:{i}"),
                                         Message("assistant", f"{w}:{i}")])
            store.get("shared")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    messages = store.get("shared").messages
    assert len(messages) == 6 * 15 * 2
    for question, answer in zip(messages[::2], messages[1::2], strict=True):
        assert (question.role, answer.role) == ("user", "assistant")
        assert question.content == answer.content


# --- storage failures --------------------------------------------------------------------------


@pytest.fixture
def locked(tmp_path: Path):
    """A store with a short busy timeout, and a second connection that can hold the file's write
    lock (what a backup tool or the sqlite3 shell does); as root a read-only file would not fail."""
    store = SQLiteSessionStore(tmp_path / "locked.db", busy_timeout_s=0.2)
    other = sqlite3.connect(store.path, isolation_level=None)
    yield store, other
    other.close()
    store.close()


def test_a_write_that_cannot_get_the_lock_is_reported_and_stores_nothing(locked):
    store, other = locked
    store.append_turn("s", turn(0), summary_cache={"covered": 2})
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(SessionStoreError) as info:
        store.append_turn("s", turn(1))
    assert isinstance(info.value, UnavailableError)  # UNAVAILABLE at the edge
    message = str(info.value)
    assert "session store could not be written (database is locked)" in message
    assert "the answer was not stored" in message and "'s'" in message
    assert str(store.path) not in message  # clients see the message; the path goes to the log
    for write, what in [(lambda: store.append_turn("t", turn(0)), "'t' keeps its earlier turns"),
                        (lambda: store.append_turn("s", turn(1), summary_cache={}),
                         "'s' keeps its earlier turns"),
                        (lambda: store.delete("s"), "'s' was not deleted")]:
        with pytest.raises(SessionStoreError, match=what):
            write()
    # Reads go on while another process writes (WAL); the failed writes left nothing behind.
    session = store.get("s")
    assert session.messages == turn(0) and session.summary_cache == {"covered": 2}
    assert store.count() == 1 and [i.id for i in store.list()] == ["s"]
    other.execute("ROLLBACK")
    store.append_turn("s", turn(1))  # the store works again once the lock is gone
    assert store.get("s").messages == [*turn(0), *turn(1)] and store.get("s").turns == 2
    assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_purge_under_a_held_lock_is_reported(tmp_path, clock):
    store = SQLiteSessionStore(tmp_path / "p.db", ttl_seconds=60, clock=clock, busy_timeout_s=0)
    store.append_turn("old", turn(0))
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(SessionStoreError, match="no expired session was deleted"):
        store.purge_expired(now=clock.now + 3600)
    other.execute("ROLLBACK")
    assert store.purge_expired(now=clock.now + 3600) == 1
    other.close()
    store.close()


def test_a_damaged_file_fails_reads_and_writes_with_a_clear_error(tmp_path):
    store = SQLiteSessionStore(tmp_path / "damaged.db")
    for i in range(40):
        store.append_turn(f"s{i}", [Message("user", "x" * 1000), Message("assistant", "y")])
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file
    with store.path.open("r+b") as f:  # keep the header page, overwrite the rest
        f.seek(4096)
        f.write(b"\xff" * (store.path.stat().st_size - 4096))
    store._db.execute("PRAGMA shrink_memory")  # no cached pages to hide the damage
    for read in (lambda: store.get("s3"), store.list, store.count):
        with pytest.raises(SessionStoreError, match=r"could not be read \(database disk image "
                                                    r"is malformed\); no session data"):
            read()
    with pytest.raises(SessionStoreError, match="could not be written .* answer was not stored"):
        store.append_turn("s3", turn(1))
    store.close()


def test_an_unusable_path_fails_at_open_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    reasons = {tmp_path: "is a directory", tmp_path / "a-file" / "sessions.db": "File exists"}
    for path, reason in reasons.items():
        with pytest.raises(FailedPreconditionError) as info:
            SQLiteSessionStore(path)
        assert f"cannot open session database {path}: " in str(info.value)
        assert reason in str(info.value)


def test_a_file_locked_at_startup_fails_the_open(tmp_path):
    path = tmp_path / "busy.db"
    SQLiteSessionStore(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(FailedPreconditionError, match=f"{path}: database is locked"):
        SQLiteSessionStore(path, busy_timeout_s=0.1)
    other.close()


# --- SIGKILL mid-write ------------------------------------------------------------------------

WRITER = """
import sys
from common.conversation import Message
from server.sessions import SQLiteSessionStore

store = SQLiteSessionStore(sys.argv[1])
prefix = sys.argv[2]
for i, _ in enumerate(sys.stdin):  # one turn per line the test sends, so it never runs ahead
    store.append_turn(f"{prefix}-{i % 3}", [
        Message("user", f"q{i} " + "x" * 3000),
        Message("assistant", f"a{i} " + "y" * 5000),
    ])
    print(i, flush=True)
"""


def run_and_kill(path: Path, prefix: str, acknowledged: int) -> int:
    """Start a writer, SIGKILL it as it starts the turn after `acknowledged` committed ones;
    returns the last ack. The writer waits for a line before each turn: free-running, it got
    several turns past the last ack the test had read on a loaded machine."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), prefix],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])
    last, deadline = -1, time.monotonic() + 60
    try:
        while last + 1 < acknowledged and time.monotonic() < deadline:
            proc.stdin.write("turn\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                break
            last = int(line)
        proc.stdin.write("turn\n")
        proc.stdin.flush()
        os.kill(proc.pid, signal.SIGKILL)  # mid-way through that next turn, most likely
    finally:
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL and last + 1 >= acknowledged
    return last


def test_sigkill_mid_turn_loses_no_committed_turn_and_leaves_no_partial_one(tmp_path):
    path = tmp_path / "crash.db"
    acks = {prefix: run_and_kill(path, prefix, acknowledged=25) for prefix in ("r1", "r2")}
    store = SQLiteSessionStore(path)
    assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for prefix, last in acks.items():
        seen = []
        for k in range(3):
            messages = store.get(f"{prefix}-{k}").messages
            assert len(messages) % 2 == 0  # whole turns only
            for question, answer in zip(messages[::2], messages[1::2], strict=True):
                i = int(question.content.split()[0][1:])
                assert question.content == f"q{i} " + "x" * 3000
                assert answer.content == f"a{i} " + "y" * 5000
                seen.append(i)
        # every acknowledged turn is there, plus at most the one committed as the kill landed
        assert sorted(seen) == list(range(len(seen))) and len(seen) - 1 in (last, last + 1)
    store.close()


# --- per-session locks ------------------------------------------------------------------------


def test_a_busy_session_answers_busy_and_others_proceed():
    async def scenario() -> None:
        locks = SessionLocks()
        async with locks.acquire("s"):
            with pytest.raises(SessionBusyError, match="'s' is busy"):
                async with locks.acquire("s"):
                    pass
            async with locks.acquire("other"):
                assert len(locks) == 2
        assert len(locks) == 0
        async with locks.acquire("s"):  # free again: no waiting needed
            pass

    asyncio.run(scenario())


def test_a_cancelled_holder_releases_the_session():
    async def scenario() -> None:
        locks, entered = SessionLocks(), asyncio.Event()

        async def request() -> None:
            async with locks.acquire("s"):
                entered.set()
                await asyncio.Event().wait()  # holds the session until cancelled

        task = asyncio.create_task(request())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(locks) == 0
        async with locks.acquire("s"):  # fails fast if the cancelled holder still had it
            pass

    asyncio.run(scenario())
