"""`SessionStore` on Redis, shared by every replica: the same guarantees as the SQLite store.

Keys, all under one prefix (default `switchboard:`):
- `<prefix>s:<id>`    hash: created, updated, turns, summary (JSON), owner (the creating key's
                      id, "" = no one: admin-only; mirrors the SQLite store's schema 2);
- `<prefix>m:<id>`    list: one JSON `{"role", "content"}` per message, in order;
- `<prefix>idx`       sorted set: session id scored by `updated` (listing, expiry, the cap);
- `<prefix>schema`    the layout version; a newer one is refused rather than misread;
- `<prefix>lease:<id>` the per-session lease of server/session_stores/redis_locks.py.

Every write is one Lua script, which Redis runs atomically: a turn (its messages, the turn count,
`updated`, the summary cache) is stored whole or not at all, expired sessions are revived empty,
and the least recently updated sessions past the cap are removed in the same step. When the
caller holds a session lease (`current_lease()`), `append_turn` first checks that the lease still
carries its token, so a request whose lease lapsed cannot interleave its turn with the request
that took the session over (it gets SessionBusyError, ABORTED at the edge).

Expiry follows the store's clock, as in SQLite: a session idle past the TTL reads as absent and
`purge_expired` deletes it. Durability is Redis's: run it with `appendonly yes` and
`appendfsync always` for the SQLite store's "acknowledged means on disk" (the store warns at
start when the server says otherwise). The scripts touch keys they compute from the prefix, so
one Redis (or a primary with replicas), not Redis Cluster.

Connection failures, timeouts and refusals (OOM, READONLY) raise SessionStoreError (UNAVAILABLE)
saying what was not stored; a Redis that cannot be reached at start fails startup naming it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from common.conversation import Message
from server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    SessionBusyError,
    SessionStoreError,
)
from server.session_stores.redis_locks import current_lease
from server.sessions import (
    ANY_OWNER,
    Session,
    SessionInfo,
    SessionSettings,
    validate_turn,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
LEASE_LOST = "LEASE_LOST"

# The append script's first step: make the session exist (an expired one is replaced by an
# empty one) and, when it was created, remove the least recently updated others past the cap.
# KEYS: idx, meta, msgs. ARGV: id, now, cutoff, cap, prefix, owner.
_REVIVE = """
local function revive(idx, meta, msgs, id, now, cutoff, cap, prefix, owner)
  cutoff = cutoff or -math.huge  -- Lua's tonumber does not read '-inf' (no TTL)
  local updated = redis.call('HGET', meta, 'updated')
  if updated and tonumber(updated) < cutoff then
    redis.call('DEL', meta, msgs)
    redis.call('ZREM', idx, id)
    updated = false
  end
  if updated then return 0 end
  redis.call('HSET', meta, 'created', now, 'updated', now, 'turns', 0, 'summary', '{}',
             'owner', owner)
  redis.call('ZADD', idx, now, id)
  local excess = cap > 0 and redis.call('ZCARD', idx) - cap or 0
  if excess > 0 then
    for _, victim in ipairs(redis.call('ZRANGE', idx, 0, excess)) do
      if victim ~= id and excess > 0 then
        redis.call('DEL', prefix .. 's:' .. victim, prefix .. 'm:' .. victim)
        redis.call('ZREM', idx, victim)
        excess = excess - 1
      end
    end
  end
  return 1
end
local function info(meta, msgs)
  local row = redis.call('HMGET', meta, 'created', 'updated', 'turns', 'owner')
  return {row[1], row[2], row[3], redis.call('LLEN', msgs), row[4] or ''}
end
"""
# KEYS: idx, meta, msgs, lease ('' = none). ARGV: id, now, cutoff, cap, prefix, owner, lease
# token, summary ('' = keep), then one JSON message per argument.
_APPEND = _REVIVE + """
if KEYS[4] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[7] then
  return redis.error_reply('""" + LEASE_LOST + """')
end
revive(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5],
       ARGV[6])
for i = 9, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
redis.call('HINCRBY', KEYS[2], 'turns', 1)
local updated = math.max(tonumber(redis.call('HGET', KEYS[2], 'updated')), tonumber(ARGV[2]))
if updated == tonumber(ARGV[2]) then redis.call('HSET', KEYS[2], 'updated', ARGV[2]) end
redis.call('ZADD', KEYS[1], updated, ARGV[1])
if ARGV[8] ~= '' then redis.call('HSET', KEYS[2], 'summary', ARGV[8]) end
return info(KEYS[2], KEYS[3])
"""
# KEYS: idx. ARGV: prefix, id, owner ('' with ARGV[4] = '1': anyone's).
_DELETE = """
local meta = ARGV[1] .. 's:' .. ARGV[2]
if ARGV[4] ~= '1' and (redis.call('HGET', meta, 'owner') or '') ~= ARGV[3] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[2])
return redis.call('DEL', ARGV[1] .. 's:' .. ARGV[2], ARGV[1] .. 'm:' .. ARGV[2])
"""
# KEYS: idx. ARGV: prefix, cutoff, limit, owner, any ('1': every owner). The most recently
# updated first; with an owner, the limit counts that owner's sessions only.
_LIST = """
local out = {}
for _, id in ipairs(redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', ARGV[2])) do
  local row = redis.call('HMGET', ARGV[1] .. 's:' .. id, 'created', 'updated', 'turns', 'owner')
  if row[1] and (ARGV[5] == '1' or (row[4] or '') == ARGV[4]) then
    out[#out + 1] = {id, row[1], row[2], row[3], redis.call('LLEN', ARGV[1] .. 'm:' .. id),
                     row[4] or ''}
    if #out >= tonumber(ARGV[3]) then break end
  end
end
return out
"""
# KEYS: idx. ARGV: prefix, cutoff (sessions updated strictly before it go).
_PURGE = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
for _, id in ipairs(gone) do
  redis.call('DEL', ARGV[1] .. 's:' .. id, ARGV[1] .. 'm:' .. id)
  redis.call('ZREM', KEYS[1], id)
end
return #gone
"""


def _as_info(session_id: str, row: Sequence[Any]) -> SessionInfo:
    created, updated, turns, count, owner = row
    return SessionInfo(session_id, float(created), float(updated), int(turns), int(count), owner)


class RedisSessionStore:
    """`SessionStore` on one Redis; safe to share between threads and between replicas."""

    def __init__(self, client: redis.Redis, prefix: str = "switchboard:",
                 ttl_seconds: float = 0.0, max_sessions: int = 0, *,
                 clock: Callable[[], float] = time.time, name: str = "redis") -> None:
        self.settings = SessionSettings(ttl_seconds, max_sessions)
        self.prefix = prefix
        self.name = name  # the URL without its password, for messages
        self._client = client
        self._clock = clock
        self._append_script = client.register_script(_APPEND)
        self._delete_script = client.register_script(_DELETE)
        self._purge_script = client.register_script(_PURGE)
        self._list_script = client.register_script(_LIST)
        self._check_server()

    def _check_server(self) -> None:
        """Reach the server and claim (or check) the layout version; FailedPreconditionError
        naming the store otherwise."""
        try:
            self._client.setnx(self._key("schema"), SCHEMA_VERSION)
            version = int(self._client.get(self._key("schema")) or 0)
        except redis.RedisError as e:
            raise FailedPreconditionError(
                f"cannot reach the session store {self.name}: {e}; check the --sessions URL and "
                "that Redis is running") from e
        if version > SCHEMA_VERSION:
            raise FailedPreconditionError(
                f"session store {self.name} (prefix {self.prefix!r}) has layout version "
                f"{version}; this server understands up to {SCHEMA_VERSION}")
        self._warn_if_not_durable()

    def _warn_if_not_durable(self) -> None:
        try:
            config = self._client.config_get("append*")
        except redis.RedisError:
            return  # managed Redis often refuses CONFIG; its durability is the provider's
        if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
            log.warning("session store %s runs with appendonly=%s appendfsync=%s: an "
                        "acknowledged turn can be lost if Redis crashes (set appendonly yes, "
                        "appendfsync always)", self.name, config.get("appendonly"),
                        config.get("appendfsync"))

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _keys(self, session_id: str) -> list[str]:
        return [self._key("idx"), self._key("s", session_id), self._key("m", session_id)]

    def _cutoff(self, now: float) -> float:
        ttl = self.settings.ttl_seconds
        return now - ttl if ttl else float("-inf")

    def _run(self, what: str, not_done: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except redis.RedisError as e:
            log.error("session store %s could not be %s: %s", self.name, what, e)
            raise SessionStoreError(
                f"the session store could not be {what} ({e}); {not_done}") from e

    def _revive_args(self, session_id: str, now: float, owner: str) -> list[Any]:
        return [session_id, repr(now), repr(self._cutoff(now)), self.settings.max_sessions,
                self.prefix, owner]

    def get(self, session_id: str) -> Session | None:
        def read() -> tuple[dict[str, str], list[str]]:
            with self._client.pipeline(transaction=True) as pipe:  # one consistent snapshot
                pipe.hgetall(self._key("s", session_id))
                pipe.lrange(self._key("m", session_id), 0, -1)
                meta, messages = pipe.execute()
            return meta, messages

        meta, raw = self._run("read", "no session data was returned or changed", read)
        if not meta or float(meta["updated"]) < self._cutoff(self._clock()):
            return None
        messages = [Message(m["role"], m["content"]) for m in map(json.loads, raw)]
        return Session(session_id, messages, json.loads(meta["summary"]), float(meta["created"]),
                       float(meta["updated"]), int(meta["turns"]), meta.get("owner", ""))

    def append_turn(self, session_id: str, new_messages: Sequence[Message],
                    summary_cache: dict[str, Any] | None = None,
                    owner: str = "") -> SessionInfo:
        validate_turn(session_id, new_messages)
        lease = current_lease()
        args = [*self._revive_args(session_id, self._clock(), owner), lease.token if lease else "",
                "" if summary_cache is None else json.dumps(summary_cache),
                *(json.dumps({"role": m.role, "content": m.content}) for m in new_messages)]
        keys = [*self._keys(session_id), lease.key if lease else ""]
        not_done = (f"the answer was not stored: session {session_id!r} keeps its earlier turns "
                    "without this one; send the turn again later")

        def write() -> Any:
            try:
                return self._append_script(keys=keys, args=args)
            except redis.ResponseError as e:
                if LEASE_LOST not in str(e):
                    raise
                raise SessionBusyError(
                    f"session {session_id!r} was taken over by another request after this "
                    "one's lease lapsed; the answer was not stored, send the turn again") from e

        return _as_info(session_id, self._run("written", not_done, write))

    def list(self, limit: int = 100, owner: str | None = ANY_OWNER) -> list[SessionInfo]:
        if limit <= 0:
            raise InvalidArgumentError(f"limit must be positive, got {limit}")
        rows = self._run("read", "no session data was returned or changed",
                         lambda: self._list_script(keys=[self._key("idx")], args=[
                             self.prefix, repr(self._cutoff(self._clock())), limit, owner or "",
                             "1" if owner is ANY_OWNER else "0"]))
        return [_as_info(row[0], row[1:]) for row in rows]

    def delete(self, session_id: str, owner: str | None = ANY_OWNER) -> bool:
        return bool(self._run("written", f"session {session_id!r} was not deleted",
                              lambda: self._delete_script(keys=[self._key("idx")], args=[
                                  self.prefix, session_id, owner or "",
                                  "1" if owner is ANY_OWNER else "0"])))

    def count(self) -> int:
        return int(self._run("read", "no session data was returned or changed",
                             lambda: self._client.zcount(
                                 self._key("idx"), repr(self._cutoff(self._clock())), "+inf")))

    def purge_expired(self, now: float | None = None) -> int:
        if not self.settings.ttl_seconds:
            return 0
        cutoff = self._cutoff(self._clock() if now is None else now)
        return int(self._run("written", "no expired session was deleted",
                             lambda: self._purge_script(keys=[self._key("idx")],
                                                        args=[self.prefix, repr(cutoff)])))

    def close(self) -> None:
        self._client.close()
