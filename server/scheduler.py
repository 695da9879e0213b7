"""Continuous-batching bookkeeping: which requests wait, which run, and what one step does.

Pure bookkeeping, no model and no torch: `schedule()` returns a `StepPlan` (running rows first,
then waiting ones admitted up to `max_batch` and the prefill token budget);
`update_from_output(plan, tokens)` appends each row's sampled token, decides who finished
(end-of-sequence, stop string, length) and returns per-request outputs for the engine to emit.
Only `add` is called from other threads; everything else runs on the engine thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from server.errors import QueueFullError
from server.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """`max_batch` rows decode together; at most `max_queue` wait; a step prefills at most
    `max_prefill_tokens` prompt tokens (always at least one request, so none starves)."""

    max_batch: int = 16
    max_queue: int = 256
    max_prefill_tokens: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class StepPlan:
    """One step: decode `running` (already in the batch), prefill `admitted` (new rows)."""

    running: tuple[Request, ...]
    admitted: tuple[Request, ...]

    @property
    def rows(self) -> tuple[Request, ...]:
        return self.running + self.admitted

    @property
    def is_empty(self) -> bool:
        return not self.running and not self.admitted


@dataclass(frozen=True)
class RequestOutput:
    """What one row produced in a step: its token, newly streamable text, and whether it ended."""

    request: Request
    token_id: int
    text_delta: str
    finished: bool


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, eos_token_ids: Collection[int], max_context: int
    ) -> None:
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context = max_context
        self._lock = threading.Lock()  # guards `_waiting` against submitting threads
        self._waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self.running)

    def add(self, request: Request) -> None:
        """Queue a request (any thread); QueueFullError at once when `max_queue` wait already."""
        with self._lock:
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(
                    f"the engine queue is full ({self.config.max_queue} requests waiting); "
                    "retry later"
                )
            self._waiting.append(request)

    def drop_aborted_waiting(self) -> list[Request]:
        """Finish (as cancelled) waiting requests whose caller cancelled or whose deadline
        passed; return them so the engine can tell their callers."""
        with self._lock:
            aborted = [r for r in self._waiting if r.abort_requested]
            if aborted:
                self._waiting = deque(r for r in self._waiting if not r.abort_requested)
        for request in aborted:
            request.finish(RequestStatus.FINISHED_CANCELLED)
        return aborted

    def schedule(self) -> StepPlan:
        """Running rows first, then admit waiting ones in arrival order while they fit."""
        admitted: list[Request] = []
        budget = self.config.max_prefill_tokens
        with self._lock:
            while self._waiting and len(self.running) + len(admitted) < self.config.max_batch:
                candidate = self._waiting[0]
                if admitted and candidate.prompt_len > budget:
                    break
                budget -= candidate.prompt_len
                admitted.append(self._waiting.popleft())
        return StepPlan(running=tuple(self.running), admitted=tuple(admitted))

    def abort_running(self, plan: StepPlan) -> list[Request]:
        """Finish (as cancelled) rows of `plan` whose caller left or whose deadline passed
        while the step ran; their tokens from this step are discarded."""
        aborted = [r for r in plan.rows if not r.status.is_finished and r.abort_requested]
        for request in aborted:
            request.finish(RequestStatus.FINISHED_CANCELLED)
        self._drop_finished()
        return aborted

    def update_from_output(
        self, plan: StepPlan, tokens: Mapping[Request, int], now: float
    ) -> list[RequestOutput]:
        """Append each live row's token, finish who is done, return what to emit."""
        outputs = []
        for request in plan.admitted:
            if not request.status.is_finished:
                request.status = RequestStatus.RUNNING
                request.admitted_at = request.admitted_at or now
                self.running.append(request)
        for request in plan.rows:
            if request.status.is_finished:
                continue
            token = tokens[request]
            status = self._append(request, token)
            if status is not None:
                request.finish(status)
            outputs.append(
                RequestOutput(request, token, request.take_text_delta(), status is not None)
            )
        self._drop_finished()
        return outputs

    def _append(self, request: Request, token: int) -> RequestStatus | None:
        """Record `token`; return the finished status it leads to, if any."""
        is_eos = token in self.eos_token_ids and not request.sampling.ignore_eos
        if request.append_output_token(token, is_eos=is_eos) or is_eos:
            return RequestStatus.FINISHED_STOPPED
        produced = request.num_output_tokens
        if produced >= request.sampling.max_new_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.prompt_len + produced >= self.max_context:
            return RequestStatus.FINISHED_LENGTH
        return None

    def take_running(self) -> list[Request]:
        """Remove and return every running request (a failed step, or shutdown)."""
        running, self.running = self.running, []
        return running

    def take_waiting(self) -> list[Request]:
        """Remove and return every waiting request (shutdown)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        return waiting

    def _drop_finished(self) -> None:
        self.running = [r for r in self.running if not r.status.is_finished]
