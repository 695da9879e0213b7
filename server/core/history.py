"""The session step: hold a session for one request, give its history, remember the answer.

A session is seen only by the key that created it and by admin keys: for any other key it
answers NOT_FOUND, in chat as in the session admin, as a session that does not exist. Store
calls block (SQLite, Redis) and run on the chat pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from common.conversation import Message
from server.context import SummaryCache
from server.core.executors import Executors
from server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SessionStoreError,
)
from server.keys import Caller
from server.sessions import Session, SessionLocks, SessionStore

SESSIONS_OFF = "sessions are disabled on this server: start it with --sessions-db PATH"


@dataclass(frozen=True)
class Turn:
    """One request's view of its session: stored history, the new messages, the summary."""

    session_id: str
    history: list[Message]
    new: list[Message]
    cached_summary: SummaryCache | None = None

    @property
    def conversation(self) -> list[Message]:
        return self.history + self.new


def session_not_found(session_id: str) -> NotFoundError:
    """The one answer for a session the caller may not see, existing or not."""
    return NotFoundError(f"session {session_id!r} does not exist for this key (or has expired)")


def check_owner(session_id: str, stored: Session | None, caller: Caller) -> Session | None:
    """`stored` if `caller` may see it; NotFoundError if it belongs to another key."""
    if stored is not None and not caller.owns(stored.owner):
        raise session_not_found(session_id)
    return stored


def turn_of(session_id: str, stored: Session | None, new: list[Message]) -> Turn:
    """A client may resend the session's system prompt each turn; an identical one is dropped,
    a different one is refused (the stored conversation keeps its first system prompt)."""
    history = list(stored.messages) if stored is not None else []
    if history and new and new[0].role == "system":
        if history[0].role == "system" and history[0].content == new[0].content:
            new = new[1:]
        else:
            raise InvalidArgumentError(
                f"session {session_id!r} already has a conversation; send only new user "
                "messages (a system prompt is allowed only on the first turn)")
    cached = SummaryCache.from_dict(stored.summary_cache) if stored is not None else None
    return Turn(session_id, history, new, cached)


class History:
    """Sessions for the chat pipeline; `store` is None when sessions are off."""

    def __init__(self, store: Any, locks: SessionLocks, executors: Executors) -> None:
        self.store = store
        self.locks = locks
        self.executors = executors

    @asynccontextmanager
    async def turn(self, session_id: str, messages: tuple[Message, ...],
                   caller: Caller) -> AsyncIterator[Turn]:
        """Hold `session_id` for one request (a second concurrent one gets ABORTED) and give
        the stored history with the new messages; NOT_FOUND when another key owns it."""
        if not session_id:
            yield Turn("", [], list(messages))
            return
        if self.store is None:
            raise FailedPreconditionError(SESSIONS_OFF)
        if not caller.is_admin:
            # Checked before the lock too: another key's busy session must answer NOT_FOUND,
            # not ABORTED, or "busy" would tell that it exists.
            check_owner(session_id, await self.executors.quick(self.store.get, session_id),
                        caller)
        async with self.locks.acquire(session_id):
            stored = await self.executors.quick(self.store.get, session_id)
            yield turn_of(session_id, check_owner(session_id, stored, caller), list(messages))

    async def remember(self, turn: Turn, answer: str, cache: SummaryCache | None,
                       owner: str) -> int | None:
        """Append the turn (a new session is owned by `owner`); the sessions now stored, or
        None when only that count could not be read."""

        def write() -> int | None:
            # The summary cache goes into the turn's own transaction: a failure after the turn
            # was stored would answer UNAVAILABLE, and a retrying client would store it twice.
            summary = (cache.to_dict() if cache is not None and cache != turn.cached_summary
                       else None)
            self.store.append_turn(turn.session_id, [*turn.new, Message("assistant", answer)],
                                   summary, owner)
            return stored_count(self.store)

        return await self.executors.quick(write)


def stored_count(store: SessionStore) -> int | None:
    """The sessions stored, or None when only that count cannot be read (a write that worked
    stays a success; only the gauge misses this update)."""
    try:
        return store.count()
    except SessionStoreError:
        return None
