"""Per-key limits: requests in flight, and token buckets on requests and on generated tokens.

Each key (by key id) has its own `KeyBudget`. A request is admitted when the key is under its
`max_in_flight`, its request bucket holds a whole request and its token bucket is not in debt;
otherwise it is refused at once with `RateLimitedError` (RESOURCE_EXHAUSTED at the edge) whose
`retry_after_s` says when the bucket will have refilled enough (the gRPC edge sends it as the
`retry-after` trailing metadata, in seconds). Generated tokens are only known as they come, so
the token bucket is charged after the fact and may go into debt: one long answer can overdraw
it, and the key then waits until the debt is repaid. Limits follow the key's current settings,
so a SIGHUP reload that changes them takes effect on the next request.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from server.errors import ResourceExhaustedError
from server.keys import Caller, KeyLimits

RETRY_AFTER_METADATA = "retry-after"
# Waits shorter than this are float noise (a caller who waited exactly the announced time).
_NO_WAIT_S = 1e-6


class RateLimitedError(ResourceExhaustedError):
    """A key is past one of its limits; `retry_after_s` is None when no wait is known
    (requests in flight end when they end)."""

    def __init__(self, message: str, retry_after_s: float | None, limit: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit


def retry_after_text(seconds: float) -> str:
    """The `retry-after` value: seconds, rounded up to the millisecond."""
    return f"{math.ceil(seconds * 1000) / 1000:.3f}"


@dataclass
class TokenBucket:
    """`capacity` units, refilled at `rate` per second; `level` may go below 0 (debt)."""

    rate: float
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` units are there (0 when they are)."""
        return max(0.0, (amount - self.level) / self.rate)

    def resize(self, rate: float, capacity: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.level = min(self.level, capacity)


def _bucket(per_minute: float, burst: int, now: float) -> TokenBucket | None:
    if not per_minute:
        return None
    capacity = float(burst or max(1.0, per_minute))
    return TokenBucket(per_minute / 60.0, capacity, capacity, now)


def _resized(bucket: TokenBucket | None, per_minute: float, burst: int,
             now: float) -> TokenBucket | None:
    if bucket is None or not per_minute:
        return _bucket(per_minute, burst, now)
    bucket.refill(now)
    bucket.resize(per_minute / 60.0, float(burst or max(1.0, per_minute)))
    return bucket


@dataclass
class KeyBudget:
    """One key's buckets and in-flight count, for its current limits."""

    limits: KeyLimits
    requests: TokenBucket | None
    tokens: TokenBucket | None
    in_flight: int = 0

    @classmethod
    def fresh(cls, limits: KeyLimits, now: float) -> KeyBudget:
        return cls(limits, _bucket(limits.requests_per_minute, limits.request_burst, now),
                   _bucket(limits.tokens_per_minute, limits.token_burst, now))

    def follow(self, limits: KeyLimits, now: float) -> None:
        """Adopt changed limits (a reload), keeping what the buckets hold."""
        if limits != self.limits:
            self.requests = _resized(self.requests, limits.requests_per_minute,
                                     limits.request_burst, now)
            self.tokens = _resized(self.tokens, limits.tokens_per_minute, limits.token_burst, now)
            self.limits = limits

    def refusal(self, caller: Caller, now: float) -> RateLimitedError | None:
        """Why a request cannot start now, or None."""
        limits = self.limits
        if limits.max_in_flight and self.in_flight >= limits.max_in_flight:
            return RateLimitedError(
                f"key {caller.name!r} has {self.in_flight} requests running, its limit "
                f"(max_in_flight); retry when one completes", None, "in_flight")
        for bucket, what, unit in ((self.requests, "requests_per_minute", "request"),
                                   (self.tokens, "tokens_per_minute", "token")):
            if bucket is None:
                continue
            bucket.refill(now)
            wait = bucket.wait_for(1.0)
            if wait > _NO_WAIT_S:
                return RateLimitedError(
                    f"key {caller.name!r} is over its limit of {getattr(limits, what):g} "
                    f"{unit}s per minute ({what}); retry after {retry_after_text(wait)} s",
                    wait, what)
        return None


@dataclass
class Permit:
    """One admitted request; `charge` its generated tokens, `release` (idempotent) on exit."""

    limiter: KeyLimiter
    key_id: str
    _held: bool = True

    def charge(self, tokens: int) -> None:
        self.limiter.charge(self.key_id, tokens)

    def release(self) -> None:
        if self._held:
            self._held = False
            self.limiter.release(self.key_id)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class KeyLimiter:
    """Every key's budget; thread-safe. Keys without limits are admitted without bookkeeping.
    `observer` (Metrics) hears of each refusal by key name and limit."""

    clock: Callable[[], float] = time.monotonic
    observer: Any = None
    _budgets: dict[str, KeyBudget] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, caller: Caller) -> Permit | None:
        """A permit for one request of `caller` (None when the key has no limits), or
        RateLimitedError."""
        if not caller.limits.any:
            return None
        with self._lock:
            now = self.clock()
            budget = self._budgets.get(caller.key_id)
            if budget is None:
                budget = self._budgets[caller.key_id] = KeyBudget.fresh(caller.limits, now)
            budget.follow(caller.limits, now)
            refusal = budget.refusal(caller, now)
            if refusal is None:
                if budget.requests is not None:
                    budget.requests.level -= 1.0
                budget.in_flight += 1
        if refusal is not None:
            if self.observer is not None:
                self.observer.observe_rate_limited(caller.name, refusal.limit)
            raise refusal
        return Permit(self, caller.key_id)

    def charge(self, key_id: str, tokens: int) -> None:
        with self._lock:
            budget = self._budgets.get(key_id)
            if budget is not None and budget.tokens is not None and tokens > 0:
                budget.tokens.refill(self.clock())
                budget.tokens.level -= tokens

    def release(self, key_id: str) -> None:
        with self._lock:
            budget = self._budgets.get(key_id)
            if budget is not None:
                budget.in_flight -= 1

    def retain(self, key_ids: Iterable[str]) -> None:
        """Forget the budgets of keys no longer configured (after a reload) that have nothing
        in flight, so the table stays as small as the key list."""
        keep = set(key_ids)
        with self._lock:
            for key_id in [k for k, b in self._budgets.items()
                           if k not in keep and not b.in_flight]:
                del self._budgets[key_id]

    def __len__(self) -> int:
        return len(self._budgets)


__all__ = ["RETRY_AFTER_METADATA", "KeyLimiter", "Permit", "RateLimitedError", "TokenBucket",
           "retry_after_text"]
