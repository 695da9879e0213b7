"""Admission: how many requests may run or wait, in total and per resolved adapter.

Every chat and score holds a place from its arrival until its answer is complete, in total and on
its adapter (the bare base counts as one); past max_concurrent_requests or
max_concurrent_per_adapter a request is refused at once with ConcurrencyLimitError instead of
queueing, and its place is given back on every exit path. A summary runs inside the chat that
needs it: it takes no second place in the total (a chat never waits on itself) but does take a
place on the summarize adapter when that is another adapter.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from common.names import BASE_NAME
from server.adapters import AdapterVersion
from server.errors import ConcurrencyLimitError


def admission_key(adapter: AdapterVersion | None) -> str:
    return adapter.key if adapter is not None else BASE_NAME


class Admission:
    """Counts the requests running or waiting, in total and per adapter; thread-safe."""

    def __init__(self, max_total: int, max_per_adapter: int) -> None:
        if max_total < 1 or max_per_adapter < 1:
            raise ValueError(f"limits must be >= 1, got max_total={max_total}, "
                             f"max_per_adapter={max_per_adapter}")
        self.max_total = max_total
        self.max_per_adapter = max_per_adapter
        self._lock = threading.Lock()
        self._total = 0
        self._per_adapter: Counter[str] = Counter()

    def admit(self) -> Ticket:
        """A ticket holding one place in the total, or ConcurrencyLimitError when full."""
        with self._lock:
            if self._total >= self.max_total:
                raise ConcurrencyLimitError(
                    f"the server is at its limit of {self.max_total} concurrent requests "
                    "(running or waiting; setting max_concurrent_requests, "
                    "--max-concurrent-requests); retry shortly")
            self._total += 1
        return Ticket(self)

    def take_adapter(self, key: str) -> None:
        with self._lock:
            if self._per_adapter[key] >= self.max_per_adapter:
                who = "the bare base model" if key == BASE_NAME else f"adapter {key}"
                raise ConcurrencyLimitError(
                    f"{who} is at its limit of {self.max_per_adapter} concurrent requests "
                    "(running or waiting; setting max_concurrent_per_adapter, "
                    "--max-concurrent-per-adapter); retry shortly or use another adapter")
            self._per_adapter[key] += 1

    def give_adapter(self, key: str) -> None:
        with self._lock:
            self._per_adapter[key] -= 1
            if not self._per_adapter[key]:
                del self._per_adapter[key]

    def give_total(self) -> None:
        with self._lock:
            self._total -= 1

    def in_flight(self) -> tuple[int, dict[str, int]]:
        """(total, {adapter: count}) right now."""
        with self._lock:
            return self._total, dict(self._per_adapter)


class Ticket:
    """One request's places in `Admission`; `release()` is idempotent and also runs on exit."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._adapter: str | None = None
        self._held = True

    def bind(self, adapter: AdapterVersion | None) -> None:
        """Also take a place on the request's resolved adapter (None = the bare base)."""
        key = admission_key(adapter)
        self._admission.take_adapter(key)
        self._adapter = key

    @contextmanager
    def nested(self, adapter: AdapterVersion | None) -> Iterator[None]:
        """A place for work done on behalf of this request (its summary) on `adapter`: none
        when that is the request's own adapter, which already holds one."""
        key = admission_key(adapter)
        if key == self._adapter:
            yield
            return
        self._admission.take_adapter(key)
        try:
            yield
        finally:
            self._admission.give_adapter(key)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission.give_total()
            if self._adapter is not None:
                self._admission.give_adapter(self._adapter)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
