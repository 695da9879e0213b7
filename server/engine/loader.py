"""Reads adapters from disk on a thread of its own, so the engine thread never waits on a disk.

The scheduler asks for an adapter (`want`) when a waiting request needs one that is not
resident; the read runs here, and the engine thread collects the results (`take_done`) at its
next step boundary and installs them into LoRA slots. One read per key at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.adapter_cache import AdapterWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadDone:
    """A finished read: the weights (with when the read began), or why it failed."""

    key: str
    weights: AdapterWeights | None
    error: BaseException | None
    started: float


class AdapterLoader:
    """One reader thread; `want` and `take_done` are safe from any thread."""

    def __init__(self, read: Callable[[Path], AdapterWeights],
                 on_done: Callable[[], None]) -> None:
        self._read = read
        self._on_done = on_done
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()  # wanted and not yet taken by the engine
        self._done: list[LoadDone] = []
        self._queue: queue.SimpleQueue[tuple[str, Path] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="switchboard-adapter-loader",
                                        daemon=True)
        self._thread.start()

    def want(self, key: str, path: Path) -> None:
        """Read `key` from `path` unless a read of it is already under way or not yet taken."""
        with self._lock:
            if key in self._in_flight:
                return
            self._in_flight.add(key)
        self._queue.put((key, path))

    def take_done(self) -> list[LoadDone]:
        with self._lock:
            done, self._done = self._done, []
            for item in done:
                self._in_flight.discard(item.key)
        return done

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            key, path = item
            started = time.perf_counter()
            try:
                done = LoadDone(key, self._read(path), None, started)
            except Exception as exc:  # reported to the requests waiting for it
                log.warning("reading adapter %s failed: %s", key, exc)
                done = LoadDone(key, None, exc, started)
            with self._lock:
                self._done.append(done)
            self._on_done()
