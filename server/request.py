"""A generation request through the engine: what is asked, its state, and the caller's stream.

`GenerationRequest` is what a caller submits; `Request` is the engine's record of it (status
enum, read-only output ids, text streamed so far); `RequestHandle` is the caller's side: events
(`TokenEvent`s then exactly one `FinishEvent`) read by plain or `async` iteration, and
`cancel()`. The engine thread is the only writer of a `Request`.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from server.detokenize import IncrementalDetokenizer
from server.sampling import SamplingParams, check_stop

BASE_KEY = "__base__"  # adapter label of the bare base, for metrics and batch checks

FinishReason = Literal["stop", "length", "cancelled"]


class RequestStatus(enum.IntEnum):
    """Ordered so that `status >= FINISHED_STOPPED` means finished."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_CANCELLED = 4
    FINISHED_ERROR = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


_FINISH_REASON: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to generate: prompt token ids, adapter key ("name@version") or None for
    the bare base, sampling settings and an optional `time.monotonic()` deadline."""

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    sampling: SamplingParams
    deadline: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if not self.prompt_ids or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.prompt_ids
        ):
            raise ValueError(
                f"prompt_ids must be a non-empty list of token ids >= 0, got {self.prompt_ids!r}"
            )
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            raise ValueError(f"adapter must be a non-empty key or None, got {self.adapter!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {type(self.sampling).__name__}")


@dataclass(frozen=True)
class TokenEvent:
    text_delta: str
    token_ids: list[int]
    completion_tokens: int


@dataclass(frozen=True)
class FinishEvent:
    reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    queue_wait_s: float | None
    ttft_s: float | None
    total_s: float


Event = TokenEvent | FinishEvent


class RequestHandle:
    """The caller's end of one request: iterate (sync or async) over its events, or cancel it.

    The engine thread pushes events; any number of threads or event loops may read. A failure
    inside the engine ends the stream by raising that exception from the iteration.
    """

    def __init__(self, request_id: str, on_cancel: Callable[[], None] | None = None) -> None:
        self.request_id = request_id
        self._on_cancel = on_cancel
        self._cancelled = threading.Event()
        self._cond = threading.Condition()
        self._events: deque[Event | BaseException] = deque()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._done = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the engine to drop this request; it finishes with reason "cancelled"."""
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def push(self, event: Event | BaseException) -> None:
        """Engine side: deliver one event (or the exception that ends the stream)."""
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that loop is closed: nobody is waiting there any more
                pass

    def _take(self) -> Event | BaseException | None:
        if self._done:
            raise StopIteration
        if not self._events:
            return None
        event = self._events.popleft()
        if isinstance(event, FinishEvent | BaseException):
            self._done = True
        return event

    def __iter__(self) -> RequestHandle:
        return self

    def __next__(self) -> Event:
        with self._cond:
            while (event := self._take()) is None:
                self._cond.wait()
        if isinstance(event, BaseException):
            raise event
        return event

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> Event:
        while True:
            with self._cond:
                try:
                    event = self._take()
                except StopIteration:
                    raise StopAsyncIteration from None
                if event is None:
                    flag = asyncio.Event()
                    self._async_waiters.append((asyncio.get_running_loop(), flag))
            if event is None:
                await flag.wait()
                continue
            if isinstance(event, BaseException):
                raise event
            return event

    def result(self) -> FinishEvent:
        """Block until the request ends; return its FinishEvent (raise its failure)."""
        finish = None
        for event in self:
            if isinstance(event, FinishEvent):
                finish = event
        assert finish is not None
        return finish


@dataclass(eq=False)
class Request:
    """The engine's record of one request. Only the engine thread mutates it."""

    spec: GenerationRequest
    handle: RequestHandle
    sampling: SamplingParams  # with max_new_tokens resolved
    detokenizer: IncrementalDetokenizer
    sampler: Any  # server.sampling.RowSampler (holds torch state; kept opaque here)
    slot: int = 0  # LoRA slot of its adapter; 0 = bare base
    holds_pin: bool = False  # whether it still holds a pin on its adapter in the cache
    arrival: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    admitted_at: float | None = None
    first_token_at: float | None = None
    _output_ids: list[int] = field(default_factory=list)
    _emitted_chars: int = 0
    _stop_scanned: int = 0
    _final_text: str | None = None

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def adapter_label(self) -> str:
        return self.spec.adapter or BASE_KEY

    @property
    def prompt_len(self) -> int:
        return len(self.spec.prompt_ids)

    @property
    def output_ids(self) -> tuple[int, ...]:
        return tuple(self._output_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._output_ids)

    @property
    def abort_requested(self) -> bool:
        deadline = self.spec.deadline
        return self.handle.cancelled or (deadline is not None and time.monotonic() >= deadline)

    def append_output_token(self, token_id: int, *, is_eos: bool) -> bool:
        """Record one generated token; return True when it hit a stop string."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self._output_ids.append(token_id)
        if is_eos:
            return False
        self.detokenizer.push(token_id)
        return self._scan_stop() is not None

    def _scan_stop(self) -> int | None:
        text = self.detokenizer.text
        found = check_stop(text, self.sampling.stop, self._stop_scanned)
        self._stop_scanned = len(text)
        if found.stop_at is not None:
            self._final_text = text[: found.stop_at]
        return found.stop_at

    def finish(self, status: RequestStatus) -> None:
        self.status = status
        if self._final_text is None:
            self.detokenizer.flush()
            stop_at = self._scan_stop()
            self._final_text = self.detokenizer.text if stop_at is None else self._final_text

    def take_text_delta(self) -> str:
        """Text that became safe to stream since the last call (all of it once finished)."""
        if self._final_text is not None:
            visible = self._final_text
        else:
            text = self.detokenizer.text
            visible = text[: check_stop(text, self.sampling.stop, len(text)).safe_len]
        delta = visible[self._emitted_chars :]
        self._emitted_chars = max(self._emitted_chars, len(visible))
        return delta

    def finish_event(self, now: float) -> FinishEvent:
        assert self.status.is_finished and self._final_text is not None
        admitted = self.admitted_at if self.admitted_at is not None else now
        return FinishEvent(
            reason=_FINISH_REASON[self.status],
            text=self._final_text,
            prompt_tokens=self.prompt_len,
            completion_tokens=self.num_output_tokens,
            queue_wait_s=admitted - self.arrival,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.arrival,
            total_s=now - self.arrival,
        )
