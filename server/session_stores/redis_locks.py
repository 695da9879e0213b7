"""Per-session exclusivity across replicas: a lease in Redis, the replica-wide `SessionLocks`.

`RedisSessionLocks` has the same `acquire(session_id, wait_s)` as server/sessions.py
`SessionLocks`, so the chat pipeline does not know which one it holds. A lease is one key
`<prefix>lease:<session id>` set with `SET NX PX` to a random token: the first request on a session
anywhere in the fleet takes it, a second one (on this replica or another) gets SessionBusyError
(ABORTED) or waits up to `wait_s`. While held, a task renews the lease every third of its
lifetime; release deletes it only if the token is still ours (compare-and-delete in Lua).

A replica killed mid-request cannot release its leases: they lapse after `lease_seconds`, and the
session continues on another replica (its clients see ABORTED until then and retry). A lease that
lapsed while its holder was merely stalled is caught when the turn is written: the holder's token
travels to `RedisSessionStore.append_turn` through `current_lease()` (a context variable, which
`asyncio.to_thread` carries into the worker thread), and the store appends only if the lease
still holds that token (fencing), so two requests never interleave turns on one session.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import redis

from server.errors import SessionBusyError, SessionStoreError

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 30.0
# How often a waiting request asks again whether the session is free.
POLL_INTERVAL_S = 0.05

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


@dataclass(frozen=True)
class Lease:
    """A held session lease: the Redis key and the token that proves it is ours."""

    key: str
    token: str


_CURRENT: contextvars.ContextVar[Lease | None] = contextvars.ContextVar(
    "switchboard_session_lease", default=None)


def current_lease() -> Lease | None:
    """The lease the running request holds, if it took one through `RedisSessionLocks`."""
    return _CURRENT.get()


def lease_key(prefix: str, session_id: str) -> str:
    return f"{prefix}lease:{session_id}"


class RedisSessionLocks:
    """One request at a time per session across every replica sharing one Redis."""

    def __init__(self, client: redis.Redis, prefix: str,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        if not (math.isfinite(lease_seconds) and lease_seconds >= 0.1):
            raise ValueError(f"lease_seconds must be a finite number >= 0.1, got {lease_seconds}")
        self._client = client
        self._prefix = prefix
        self._lease_ms = int(lease_seconds * 1000)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._held: dict[str, str] = {}

    def __len__(self) -> int:
        """Sessions this replica holds a lease on."""
        return len(self._held)

    @contextlib.asynccontextmanager
    async def acquire(self, session_id: str, wait_s: float = 0.0) -> AsyncIterator[None]:
        lease = Lease(lease_key(self._prefix, session_id), secrets.token_hex(16))
        await self._take(lease, session_id, wait_s)
        self._held[session_id] = lease.token
        renewer = asyncio.create_task(self._keep(lease, session_id))
        marker = _CURRENT.set(lease)
        try:
            yield
        finally:
            # A generator finalized outside its task (loop shutdown) runs in another context,
            # where the marker means nothing and the lease is gone with that context anyway.
            with contextlib.suppress(ValueError):
                _CURRENT.reset(marker)
            renewer.cancel()
            del self._held[session_id]
            await asyncio.to_thread(self._give_back, lease)

    async def _take(self, lease: Lease, session_id: str, wait_s: float) -> None:
        deadline = time.monotonic() + max(wait_s, 0.0)
        while not await asyncio.to_thread(
                self._call, self._client.set, lease.key, lease.token, nx=True, px=self._lease_ms):
            if time.monotonic() >= deadline:
                raise SessionBusyError(
                    f"session {session_id!r} is busy with another request (possibly on another "
                    "replica); retry when it completes")
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _keep(self, lease: Lease, session_id: str) -> None:
        """Renew the lease every third of its lifetime until cancelled."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                kept = await asyncio.to_thread(self._renew, keys=[lease.key],
                                               args=[lease.token, self._lease_ms])
            except redis.RedisError as e:
                log.warning("could not renew the lease on session %r: %s", session_id, e)
                continue
            if not kept:
                # The turn will be refused when written (fencing); nothing to do here.
                log.warning("lost the lease on session %r (it lapsed)", session_id)
                return

    def _give_back(self, lease: Lease) -> None:
        try:
            self._release(keys=[lease.key], args=[lease.token])
        except redis.RedisError as e:
            log.warning("could not release %s (it lapses by itself): %s", lease.key, e)

    @staticmethod
    def _call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except redis.RedisError as e:
            raise SessionStoreError(
                f"the session store could not be reached to lock the session ({e}); "
                "nothing was changed") from e
