"""The session store contract, run against every backend: SQLite (a real file) and Redis (a real
redis-server on a loopback port). Two store objects on one backend stand for two replicas.

What every backend promises: turns stored whole and in order, the summary cache with its turn,
expiry after the TTL, the cap evicting the least recently updated session, no interleaved turns
under concurrent writers, and one request at a time per session through the backend's lock (for
Redis across replicas, with a lease that lapses when its holder dies and fences a late writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.conversation import Message
from server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    SessionBusyError,
    SessionStoreError,
)
from server.session_stores import open_sessions, parse_sessions_url
from server.sessions import SessionSettings, SessionStore

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from replica_stack import find_tool, redis_server  # noqa: E402
from test_sessions import Clock, turn  # noqa: E402 - the SQLite tests' fake clock and turns

BACKENDS = ("sqlite", "redis")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if find_tool("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; `make tools`): "
                    "the Redis backend of the session store contract is NOT tested")
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


Opener = Callable[..., tuple[SessionStore, object]]


@contextlib.contextmanager
def opener(url: str) -> Iterator[Opener]:
    """`open(ttl_seconds=..., max_sessions=..., clock=..., lease_seconds=...)`: a (store, locks)
    pair on `url`; every call is another replica's view of the same sessions."""
    opened: list[SessionStore] = []

    def open_(ttl_seconds: float = 0.0, max_sessions: int = 0, clock: Clock | None = None,
              lease_seconds: float = 30.0) -> tuple[SessionStore, object]:
        found = open_sessions(parse_sessions_url(url), SessionSettings(ttl_seconds, max_sessions),
                              lease_seconds, clock=clock or Clock())
        opened.append(found.store)
        return found.store, found.locks

    try:
        yield open_
    finally:
        for store in opened:
            store.close()


def fresh_prefix(redis_url: str) -> str:
    """The Redis URL with a key prefix of its own: tests share one server, never their keys."""
    return f"{redis_url}?prefix=t{uuid.uuid4().hex[:8]}:"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    if request.param == "sqlite":
        url = str(tmp_path / "sessions.db")
    else:
        url = fresh_prefix(request.getfixturevalue("redis_url"))
    with opener(url) as open_:
        yield open_


@pytest.fixture
def redis_backend(redis_url: str) -> Iterator[Opener]:
    with opener(fresh_prefix(redis_url)) as open_:
        yield open_


@pytest.fixture
def store(backend: Opener) -> SessionStore:
    return backend()[0]


# --- the store ---------------------------------------------------------------------------------


def test_turns_round_trip_in_order_with_their_times(backend: Opener) -> None:
    clock = Clock()
    store, _ = backend(clock=clock)
    assert store.get("s") is None
    first = store.append_turn("s", turn(0))
    clock.now += 5
    second = store.append_turn("s", turn(1))
    session = store.get("s")
    assert session.messages == turn(0) + turn(1)
    assert (session.turns, session.created, session.updated) == (2, 1_000_000.0, 1_000_005.0)
    assert (first.turns, first.message_count) == (1, 2)
    assert (second.turns, second.message_count, second.updated) == (2, 4, 1_000_005.0)


@pytest.mark.parametrize("bad", ["", "has space", "-leading", "x" * 129, "semi;colon"])
def test_session_ids_and_empty_turns_are_refused(store: SessionStore, bad: str) -> None:
    with pytest.raises(InvalidArgumentError, match="session id must be"):
        store.append_turn(bad, turn(0))
    with pytest.raises(InvalidArgumentError, match="at least one message"):
        store.append_turn("ok", [])
    assert store.count() == 0


def test_the_summary_cache_goes_with_its_turn_and_stays_until_replaced(backend: Opener) -> None:
    store, _ = backend()
    store.append_turn("s", turn(0))
    assert store.get("s").summary_cache == {}
    store.append_turn("s", turn(1), {"upto": 2, "text": "a summary"})
    store.append_turn("s", turn(2))  # a turn without a summary keeps the stored one
    assert store.get("s").summary_cache == {"upto": 2, "text": "a summary"}
    store.append_turn("s", turn(3), {"upto": 6, "text": "newer"})
    session = store.get("s")
    assert session.summary_cache == {"upto": 6, "text": "newer"} and session.turns == 4


def test_list_count_and_delete(backend: Opener) -> None:
    clock = Clock()
    store, _ = backend(clock=clock)
    for name in ("a", "b", "c"):
        clock.now += 1
        store.append_turn(name, turn(0))
    clock.now += 1
    store.append_turn("a", turn(1))
    assert [s.id for s in store.list()] == ["a", "c", "b"]
    assert [s.id for s in store.list(limit=2)] == ["a", "c"]
    assert store.list()[0].message_count == 4 and store.count() == 3
    assert store.delete("c") and not store.delete("c")
    assert store.get("c") is None and store.count() == 2
    with pytest.raises(InvalidArgumentError, match="limit must be positive"):
        store.list(limit=0)


def test_sessions_expire_after_their_ttl_and_come_back_empty(backend: Opener) -> None:
    clock = Clock()
    store, _ = backend(ttl_seconds=60, clock=clock)
    store.append_turn("old", turn(0))
    clock.now += 30
    store.append_turn("new", turn(0))
    clock.now += 45  # "old" idle 75 s, "new" 45 s
    assert store.get("old") is None and store.get("new") is not None
    assert [s.id for s in store.list()] == ["new"] and store.count() == 1
    revived = store.append_turn("old", turn(5))
    assert (revived.turns, store.get("old").messages) == (1, turn(5))
    assert store.purge_expired(now=clock.now + 3600) == 2 and store.count() == 0


def test_the_cap_evicts_the_least_recently_updated(backend: Opener) -> None:
    clock = Clock()
    store, _ = backend(max_sessions=2, clock=clock)
    for name in ("a", "b"):
        clock.now += 1
        store.append_turn(name, turn(0))
    clock.now += 1
    store.append_turn("a", turn(1))  # "b" is now the least recently updated
    clock.now += 1
    store.append_turn("c", turn(0))
    assert sorted(s.id for s in store.list()) == ["a", "c"] and store.get("b") is None


def test_the_creating_key_owns_the_session_and_filters_list_and_delete(backend: Opener) -> None:
    clock = Clock()
    store, _ = backend(clock=clock)
    store.append_turn("a1", turn(0), owner="key-a")
    clock.now += 1
    store.append_turn("b1", turn(0), owner="key-b")
    clock.now += 1
    store.append_turn("legacy", turn(0))  # no owner: admin-only
    clock.now += 1
    store.append_turn("a1", turn(1), owner="key-b")  # a later writer never takes it over
    assert store.get("a1").owner == "key-a" and store.get("legacy").owner == ""
    assert [(s.id, s.owner) for s in store.list()] == [
        ("a1", "key-a"), ("legacy", ""), ("b1", "key-b")]
    assert [s.id for s in store.list(owner="key-b")] == ["b1"]
    assert [s.id for s in store.list(limit=1, owner="")] == ["legacy"]
    assert not store.delete("a1", owner="key-b") and store.get("a1") is not None
    assert store.delete("a1", owner="key-a") and store.delete("b1")


def test_writers_on_two_replicas_never_interleave_a_turn(backend: Opener) -> None:
    replicas = [backend()[0], backend()[0]]

    def writer(w: int) -> None:
        for i in range(10):
            replicas[w % 2].append_turn("shared", [Message("user", f"{w}:{i}"),
                                                   Message("assistant", f"{w}:{i}")])
            replicas[(w + 1) % 2].get("shared")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    session = replicas[0].get("shared")
    assert session.turns == 40 and len(session.messages) == 80
    for question, answer in zip(session.messages[::2], session.messages[1::2], strict=True):
        assert (question.role, answer.role, question.content) == ("user", "assistant",
                                                                  answer.content)


# --- one request at a time per session -----------------------------------------------------


def test_a_busy_session_answers_busy_until_released(backend: Opener) -> None:
    _, locks = backend()

    async def scenario() -> None:
        async with locks.acquire("s"):
            with pytest.raises(SessionBusyError, match="'s' is busy"):
                async with locks.acquire("s"):
                    pass
            async with locks.acquire("other"):
                pass
        async with locks.acquire("s"):
            pass

    asyncio.run(scenario())


def test_a_waiter_gets_the_session_when_the_holder_leaves(backend: Opener) -> None:
    _, locks = backend()
    order: list[str] = []

    async def scenario() -> None:
        entered, waiting = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with locks.acquire("s"):
                order.append("holder in")
                entered.set()
                await waiting.wait()  # leave only once the waiter has asked for the session
                order.append("holder out")

        async def waiter() -> None:
            await entered.wait()
            waiting.set()
            async with locks.acquire("s", wait_s=10):
                order.append("waiter in")

        await asyncio.gather(holder(), waiter())

    asyncio.run(scenario())
    assert order == ["holder in", "holder out", "waiter in"]


def test_a_waiter_gives_up_busy_when_the_holder_stays(backend: Opener) -> None:
    _, locks = backend()

    async def scenario() -> None:
        async with locks.acquire("s"):
            with pytest.raises(SessionBusyError, match="'s' is busy"):
                async with locks.acquire("s", wait_s=0.1):
                    pass
        async with locks.acquire("s"):
            pass

    asyncio.run(scenario())


# --- Redis only: leases, fencing, failures -------------------------------------------------


def test_a_session_held_on_one_replica_is_busy_on_another(redis_backend: Opener) -> None:
    (_, mine), (_, theirs) = redis_backend(), redis_backend()

    async def scenario() -> None:
        async with mine.acquire("s"):
            with pytest.raises(SessionBusyError, match="possibly on another replica"):
                async with theirs.acquire("s"):
                    pass
        async with theirs.acquire("s"):  # released everywhere once mine leaves
            pass

    asyncio.run(scenario())


def test_a_dead_holders_lease_lapses_and_the_session_continues(redis_backend: Opener) -> None:
    """A replica killed mid-request never releases: its lease lapses after lease_seconds."""
    store, alive = redis_backend(lease_seconds=0.5)
    # What a replica SIGKILLed while holding the session leaves behind: a lease nobody renews.
    store._client.set(_lease_key(store, "s"), "token-of-a-dead-replica", px=500)

    async def scenario() -> None:
        with pytest.raises(SessionBusyError):
            async with alive.acquire("s"):
                pass
        async with alive.acquire("s", wait_s=10):
            await asyncio.to_thread(store.append_turn, "s", turn(0))

    asyncio.run(scenario())
    assert store.get("s").messages == turn(0)


def test_a_writer_whose_lease_lapsed_cannot_interleave(redis_backend: Opener) -> None:
    store, slow = redis_backend(lease_seconds=0.3)
    _, fast = redis_backend(lease_seconds=0.3)
    store.append_turn("s", turn(0))

    async def scenario() -> None:
        async with slow.acquire("s"):
            # The lease lapses (a stalled event loop missed its renewals) and fast takes over.
            await asyncio.to_thread(store._client.delete, _lease_key(store, "s"))
            async with fast.acquire("s"):
                await asyncio.to_thread(store.append_turn, "s", turn(1))
            with pytest.raises(SessionBusyError, match="taken over by another request"):
                await asyncio.to_thread(store.append_turn, "s", turn(2))

    asyncio.run(scenario())
    assert store.get("s").messages == turn(0) + turn(1)


def _lease_key(store: object, session_id: str) -> str:
    from server.session_stores.redis_locks import lease_key

    return lease_key(store.prefix, session_id)


def test_an_unreachable_redis_fails_startup_naming_it_without_the_password() -> None:
    url = parse_sessions_url("redis://:hunter2@127.0.0.1:1/0?socket_connect_timeout=1")
    with pytest.raises(FailedPreconditionError) as caught:
        open_sessions(url, SessionSettings(), 30.0)
    assert "redis://127.0.0.1:1/0" in str(caught.value) and "hunter2" not in str(caught.value)


def test_redis_going_away_is_unavailable_and_acknowledged_turns_survive_it(
        tmp_path: Path) -> None:
    if find_tool("redis-server") is None:
        pytest.skip("redis-server is not installed (`make tools`): Redis restart NOT tested")
    with redis_server(tmp_path / "r") as url:
        found = open_sessions(parse_sessions_url(url + "?socket_timeout=2"), SessionSettings(), 5)
        found.store.append_turn("s", turn(0))
    with pytest.raises(SessionStoreError, match="the answer was not stored"):
        found.store.append_turn("s", turn(1))
    with redis_server(tmp_path / "r") as url:  # the same directory: its append-only file
        again = open_sessions(parse_sessions_url(url), SessionSettings(), 5).store
        assert again.get("s").messages == turn(0)
        again.close()
    found.store.close()


def test_a_newer_layout_is_refused(redis_backend: Opener) -> None:
    store, _ = redis_backend()
    store._client.set(store.prefix + "schema", 99)
    with pytest.raises(FailedPreconditionError, match="layout version 99"):
        redis_backend()
