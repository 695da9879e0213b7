"""Continuous-batching bookkeeping: which requests wait, which run, and what one step does.

Pure bookkeeping, no model and no torch. `schedule()` returns a `StepPlan`: the running rows
first, then waiting ones admitted in arrival order up to `max_batch` and the prefill token
budget. A waiting request is admitted only when its adapter is resident, and it pins the adapter
at admission (vLLM's `max_loras`): one whose adapter is not resident stays waiting
(WAITING_FOR_ADAPTER) while the engine loads it, and the requests behind it go ahead. So a step
never holds more distinct adapters than there are slots, and nobody fails for want of a slot.
`update_from_output(plan, tokens)` appends each row's sampled token, decides who finished
(end-of-sequence, length) and returns per-row outputs for the engine to emit.
Only `add` and `note_cancel` are called from other threads; the rest runs on the engine thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple, Protocol

from server.engine_config import SchedulerConfig
from server.errors import QueueFullError
from server.request import Request, RequestStatus


class Residency(Protocol):
    """What the scheduler asks of the adapter cache and loader (fakes implement it in tests)."""

    def try_pin(self, key: str) -> int | None:
        """Pin a resident adapter and return its slot; None when it is not resident."""

    def want(self, key: str, path: Path | None) -> None:
        """Make sure a load of `key` is under way (idempotent)."""


@dataclass(frozen=True)
class StepPlan:
    """One step: decode `running` (already in the batch), prefill `admitted` (new rows)."""

    running: tuple[Request, ...]
    admitted: tuple[Request, ...]

    @cached_property
    def rows(self) -> tuple[Request, ...]:
        return self.running + self.admitted

    @property
    def is_empty(self) -> bool:
        return not self.running and not self.admitted


class RowOutput(NamedTuple):
    """What one row produced in a step: its token, or the error that ended it alone. (A
    tuple: the scheduler makes one per row per step, and a frozen dataclass costs more.)"""

    request: Request
    token_id: int
    is_eos: bool
    error: BaseException | None = None


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, eos_token_ids: Collection[int], max_context: int,
        adapters: Residency,
    ) -> None:
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context = max_context
        self.adapters = adapters
        self._lock = threading.Lock()  # guards `_waiting` and `_wanted` against submitters
        self._waiting: deque[Request] = deque()
        self._wanted: Counter[str] = Counter()  # adapter keys of waiting requests
        self.arrivals = 0  # requests ever queued: the engine tells new ones from seen ones
        self.running: list[Request] = []
        # Rows are looked at for an abort only after a cancel was noted or once the earliest
        # deadline among them may have passed: most steps have neither, and 64 rows' checks
        # would cost a tenth of the engine's own time per step.
        self._cancel_noted = False
        self._earliest_deadline = math.inf

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self.running)

    def wanted_adapters(self) -> frozenset[str]:
        """Adapters that waiting requests need: evicting one would only reload it."""
        with self._lock:
            return frozenset(self._wanted)

    def add(self, request: Request) -> None:
        """Queue a request (any thread); QueueFullError at once when `max_queue` wait already."""
        request.stop_ids = frozenset() if request.sampling.ignore_eos else self.eos_token_ids
        request.token_limit = min(request.sampling.max_new_tokens,
                                  self.max_context - request.prompt_len)
        with self._lock:
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(
                    f"the engine queue is full ({self.config.max_queue} requests waiting); "
                    "retry later"
                )
            self.arrivals += 1
            request.arrival = self.arrivals
            self._waiting.append(request)
            if request.spec.adapter is not None:
                self._wanted[request.spec.adapter] += 1

    def _forget_wanted(self, request: Request) -> None:
        key = request.spec.adapter
        if key is not None:
            self._wanted[key] -= 1
            if not self._wanted[key]:
                del self._wanted[key]

    def _take_waiting(self, which: Callable[[Request], bool]) -> list[Request]:
        """Remove and return the waiting requests for which `which` is true."""
        with self._lock:
            taken, kept = [], deque()
            for request in self._waiting:
                (taken if which(request) else kept).append(request)
            if taken:
                self._waiting = kept
                for request in taken:
                    self._forget_wanted(request)
        return taken

    def note_cancel(self) -> None:
        """A caller cancelled a request (any thread): the next step looks at every row."""
        self._cancel_noted = True

    def drop_aborted_waiting(self) -> list[Request]:
        """Finish (as cancelled) waiting requests whose caller cancelled or whose deadline
        passed; return them so the engine can tell their callers."""
        now = time.monotonic()
        taken = self._take_waiting(lambda r: r.abort_requested(now))
        for request in taken:
            request.status = RequestStatus.FINISHED_CANCELLED
        return taken

    def fail_waiting_for(self, key: str) -> list[Request]:
        """Remove the requests waiting for adapter `key` (its load failed)."""
        taken = self._take_waiting(lambda r: r.spec.adapter == key)
        for request in taken:
            request.status = RequestStatus.FINISHED_ERROR
        return taken

    def schedule(self, arrivals_seen: int | None = None) -> StepPlan:
        """Running rows first, then admit waiting ones in arrival order while they fit; only
        those among the first `arrivals_seen` arrivals when given (later ones wait a step)."""
        room = self.config.max_batch - len(self.running)
        if room <= 0 or not self._waiting:
            return StepPlan(running=tuple(self.running), admitted=())
        admitted: list[Request] = []
        budget = self.config.max_prefill_tokens
        last = self.arrivals if arrivals_seen is None else arrivals_seen
        with self._lock:
            kept: deque[Request] = deque()
            for request in self._waiting:
                if (room == 0 or request.arrival > last
                        or (admitted and request.prompt_len > budget)):
                    kept.append(request)
                    continue
                if not self._admit(request):
                    kept.append(request)
                    continue
                self._forget_wanted(request)
                admitted.append(request)
                if request.spec.deadline is not None:
                    self._earliest_deadline = min(self._earliest_deadline, request.spec.deadline)
                budget -= request.prompt_len
                room -= 1
            self._waiting = kept
        return StepPlan(running=tuple(self.running), admitted=tuple(admitted))

    def _admit(self, request: Request) -> bool:
        """Pin the request's adapter if it is resident; otherwise make sure it is loading."""
        key = request.spec.adapter
        if key is None:
            return True
        slot = self.adapters.try_pin(key)
        if slot is None:
            request.status = RequestStatus.WAITING_FOR_ADAPTER
            self.adapters.want(key, request.spec.adapter_path)
            return False
        request.slot, request.holds_pin = slot, True
        return True

    def abort_running(self, plan: StepPlan) -> list[Request]:
        """Finish (as cancelled) rows of `plan` whose caller left or whose deadline passed
        while the step ran; their tokens from this step are discarded."""
        now = time.monotonic()
        if not self._cancel_noted and now < self._earliest_deadline:
            return []
        self._cancel_noted = False  # before looking: a cancel from now on is seen next step
        aborted = [r for r in plan.rows if r.abort_requested(now) and not r.status.is_finished]
        for request in aborted:
            request.status = RequestStatus.FINISHED_CANCELLED
        return aborted

    def update_from_output(
        self, plan: StepPlan, tokens: Mapping[Request, int | BaseException],
    ) -> list[RowOutput]:
        """Append each live row's token, finish who is done, return what to emit. A row whose
        sampling failed finishes alone with its error."""
        for request in plan.admitted:
            if not request.status.is_finished:
                request.status = RequestStatus.RUNNING
                self.running.append(request)
        outputs = []
        append = outputs.append
        someone_left = False  # most steps nobody finishes: keep `running` as it is then
        finished = RequestStatus.FINISHED_STOPPED
        for request in plan.rows:
            if request.status >= finished:  # aborted while the step ran
                someone_left = True
                continue
            token = tokens[request]
            if isinstance(token, BaseException):
                request.status = RequestStatus.FINISHED_ERROR
                append(RowOutput(request, -1, False, token))
                someone_left = True
                continue
            produced = request.num_output_tokens = request.num_output_tokens + 1
            if token in request.stop_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                append(RowOutput(request, token, True))
                someone_left = True
            elif produced >= request.token_limit:
                request.status = RequestStatus.FINISHED_LENGTH
                append(RowOutput(request, token, False))
                someone_left = True
            else:
                append(RowOutput(request, token, False))
        if someone_left:
            self.running = [r for r in self.running if not r.status.is_finished]
            self._earliest_deadline = min(
                (r.spec.deadline for r in self.running if r.spec.deadline is not None),
                default=math.inf)
        return outputs

    def take_running(self) -> list[Request]:
        """Remove and return every running request (shutdown)."""
        running, self.running = self.running, []
        return running

    def take_waiting(self) -> list[Request]:
        """Remove and return every waiting request (shutdown)."""
        return self._take_waiting(lambda _: True)
