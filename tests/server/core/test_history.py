"""The session step: one request per session at a time, the stored history seen only by its
owner and admins, a resent system prompt, and what is remembered of a turn."""

from __future__ import annotations

import asyncio

import pytest

from common.conversation import Message
from server.context import SummaryCache
from server.core import Executors
from server.core.history import SESSIONS_OFF, History, Turn, turn_of
from server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SessionBusyError,
    SessionStoreError,
)
from server.keys import ANONYMOUS, Caller
from server.sessions import Session, SessionLocks
from tests.server.core.fakes import MemorySessions, admin_key, api_key

ALICE, BOB = api_key("alice"), api_key("bob")
HELLO = (Message("user", "hello"),)
CACHE = SummaryCache(covered=2, digest="d1", summary="they met")


def stored_session(owner: Caller, *messages: Message, cache: SummaryCache | None = None,
                   session_id: str = "s1") -> MemorySessions:
    store = MemorySessions()
    store.append_turn(session_id, list(messages) or [Message("user", "hi"),
                                                      Message("assistant", "hello")],
                      cache.to_dict() if cache else None, owner.key_id)
    return store


def turn(history: History, session_id: str, messages: tuple[Message, ...],
         caller: Caller) -> Turn:
    async def enter() -> Turn:
        async with history.turn(session_id, messages, caller) as held:
            return held

    return asyncio.run(enter())


def test_a_stateless_call_needs_no_store(executors: Executors) -> None:
    history = History(None, SessionLocks(), executors)
    assert turn(history, "", HELLO, ALICE) == Turn("", [], list(HELLO))


def test_a_session_on_a_server_without_sessions_is_a_failed_precondition(
        executors: Executors) -> None:
    history = History(None, SessionLocks(), executors)
    with pytest.raises(FailedPreconditionError) as refused:
        turn(history, "s1", HELLO, ALICE)
    assert str(refused.value) == SESSIONS_OFF and "--sessions-db" in SESSIONS_OFF


def test_a_new_session_starts_with_the_new_messages(executors: Executors) -> None:
    held = turn(History(MemorySessions(), SessionLocks(), executors), "s1", HELLO, ALICE)
    assert held.history == [] and held.conversation == list(HELLO)
    assert held.cached_summary is None


def test_a_stored_session_gives_its_history_and_summary_to_its_owner(
        executors: Executors) -> None:
    store = stored_session(ALICE, cache=CACHE)
    held = turn(History(store, SessionLocks(), executors), "s1", HELLO, ALICE)
    assert [m.content for m in held.conversation] == ["hi", "hello", "hello"]
    assert held.cached_summary == CACHE


def test_another_keys_session_answers_as_absent(executors: Executors) -> None:
    history = History(stored_session(ALICE), SessionLocks(), executors)
    with pytest.raises(NotFoundError) as refused:
        turn(history, "s1", HELLO, BOB)
    assert str(refused.value) == ("session 's1' does not exist for this key (or has expired)")


def test_a_session_made_without_a_key_is_seen_by_admins_only(executors: Executors) -> None:
    history = History(stored_session(ANONYMOUS), SessionLocks(), executors)
    with pytest.raises(NotFoundError):
        turn(history, "s1", HELLO, ALICE)
    assert len(turn(history, "s1", HELLO, admin_key("root")).history) == 2


def test_an_admin_sees_every_keys_session(executors: Executors) -> None:
    history = History(stored_session(ALICE), SessionLocks(), executors)
    assert len(turn(history, "s1", HELLO, admin_key("root")).history) == 2


def test_a_second_request_on_a_busy_session_is_aborted(executors: Executors) -> None:
    history = History(stored_session(ALICE), SessionLocks(), executors)

    async def two_at_once() -> None:
        async with history.turn("s1", HELLO, ALICE):
            with pytest.raises(SessionBusyError, match="session 's1' is busy"):
                async with history.turn("s1", HELLO, ALICE):
                    pass

    asyncio.run(two_at_once())


def test_another_keys_busy_session_answers_not_found_not_busy(executors: Executors) -> None:
    """"Busy" would tell that the session exists."""
    history = History(stored_session(ALICE), SessionLocks(), executors)

    async def intruder_while_busy() -> None:
        async with history.turn("s1", HELLO, ALICE):
            with pytest.raises(NotFoundError):
                async with history.turn("s1", HELLO, BOB):
                    pass

    asyncio.run(intruder_while_busy())


def test_the_session_is_free_again_after_a_request_fails(executors: Executors) -> None:
    locks = SessionLocks()
    history = History(stored_session(ALICE), locks, executors)

    async def fail_inside() -> None:
        async with history.turn("s1", HELLO, ALICE):
            raise InvalidArgumentError("bad request")

    with pytest.raises(InvalidArgumentError):
        asyncio.run(fail_inside())
    assert len(locks) == 0
    assert len(turn(history, "s1", HELLO, ALICE).history) == 2


def test_a_system_prompt_opens_a_new_session() -> None:
    new = [Message("system", "be brief"), Message("user", "hi")]
    assert turn_of("s1", None, new).new == new


def test_the_same_system_prompt_resent_each_turn_is_dropped(executors: Executors) -> None:
    system = Message("system", "be brief")
    store = stored_session(ALICE, system, Message("user", "hi"), Message("assistant", "yo"))
    held = turn(History(store, SessionLocks(), executors), "s1", (system, *HELLO), ALICE)
    assert held.new == list(HELLO)
    assert [m.role for m in held.conversation] == ["system", "user", "assistant", "user"]


@pytest.mark.parametrize("first", [Message("system", "be brief"), Message("user", "hi")])
def test_another_system_prompt_on_a_stored_session_is_refused(
        executors: Executors, first: Message) -> None:
    store = stored_session(ALICE, first, Message("assistant", "yo"))
    history = History(store, SessionLocks(), executors)
    with pytest.raises(InvalidArgumentError,
                       match="a system prompt is allowed only on the first turn"):
        turn(history, "s1", (Message("system", "be verbose"), *HELLO), ALICE)


def test_an_unreadable_summary_cache_is_no_cache(executors: Executors) -> None:
    store = MemorySessions()
    store.sessions["s1"] = Session("s1", [Message("user", "hi")], {"covered": "many"},
                                   owner=ALICE.key_id)
    held = turn(History(store, SessionLocks(), executors), "s1", HELLO, ALICE)
    assert held.cached_summary is None


def test_remembering_stores_the_new_messages_and_the_answer_for_the_owner(
        executors: Executors) -> None:
    store = MemorySessions()
    history = History(store, SessionLocks(), executors)
    stored = asyncio.run(history.remember(Turn("s1", [], list(HELLO)), "hi there", None,
                                          ALICE.key_id))
    assert stored == 1
    session = store.get("s1")
    assert [(m.role, m.content) for m in session.messages] == [("user", "hello"),
                                                               ("assistant", "hi there")]
    assert session.owner == ALICE.key_id and session.summary_cache == {}


class CacheWrites(MemorySessions):
    """Remembers the summary argument of each append."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[dict | None] = []

    def append_turn(self, session_id: str, new: list[Message], summary: dict | None = None,
                    owner: str = "") -> None:
        self.written.append(summary)
        super().append_turn(session_id, new, summary, owner)


def test_a_summary_cache_is_written_only_when_it_changed(executors: Executors) -> None:
    store = CacheWrites()
    history = History(store, SessionLocks(), executors)
    held = Turn("s1", [], list(HELLO), CACHE)
    fresh = SummaryCache(covered=4, digest="d2", summary="they met twice")
    for cache in (CACHE, None, fresh):
        asyncio.run(history.remember(held, "ok", cache, ALICE.key_id))
    assert store.written == [None, None, fresh.to_dict()]
    assert store.get("s1").summary_cache == fresh.to_dict()


def test_a_turn_is_kept_when_only_the_session_count_cannot_be_read(
        executors: Executors) -> None:
    store = MemorySessions()
    store.count_error = SessionStoreError("database is locked")
    history = History(store, SessionLocks(), executors)
    assert asyncio.run(history.remember(Turn("s1", [], list(HELLO)), "ok", None, "")) is None
    assert len(store.get("s1").messages) == 2


def test_a_turn_the_store_cannot_write_fails_the_call(executors: Executors) -> None:
    class Full(MemorySessions):
        def append_turn(self, *args: object, **kwargs: object) -> None:
            raise SessionStoreError("disk full")

    history = History(Full(), SessionLocks(), executors)
    with pytest.raises(SessionStoreError, match="disk full"):
        asyncio.run(history.remember(Turn("s1", [], list(HELLO)), "ok", None, ""))
