"""A generation request through the engine: what is asked, its state, and the caller's stream.

`GenerationRequest` is what a caller submits; `Request` is the engine's record of it (status
enum, where it runs); `RequestHandle` is the caller's side: the engine pushes token ids and one
finish, and the reader turns them into `TokenEvent`s then exactly one `FinishEvent` (plain or
`async` iteration), with text and stop strings handled by `server.output` on the reading side.
The engine thread is the only writer of a `Request`.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple

from common.names import adapter_name
from server.output import OutputProcessor
from server.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled"]


class RequestStatus(enum.IntEnum):
    """Ordered so that `status >= FINISHED_STOPPED` means finished."""

    WAITING = 0
    WAITING_FOR_ADAPTER = 1  # its adapter is not resident: a load is under way or queued
    RUNNING = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_CANCELLED = 5
    FINISHED_ERROR = 6

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
    the bare base, sampling settings and an optional `time.monotonic()` deadline.

    `adapter_path` is where the adapter's files are, so the engine can load it when it is not
    resident (the request waits meanwhile); without it the adapter must already be loaded.
    """

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    sampling: SamplingParams
    deadline: float | None = None
    adapter_path: Path | None = None

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
        if self.adapter is None and self.adapter_path is not None:
            raise ValueError("adapter_path needs an adapter key")
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {type(self.sampling).__name__}")


@dataclass(frozen=True)
class TokenEvent:
    """One or more new tokens: every token the engine had pushed when the reader looked (a
    reader that lags behind the engine takes what piled up as one event, not one per token)."""

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


class _Token(NamedTuple):
    """What the engine pushes per step: one token id, whether it is end-of-sequence, and how
    the request ended when this is its last token. (A tuple: the engine makes one per row per
    step, and a frozen dataclass costs several times more to build.)"""

    token_id: int
    is_eos: bool
    finish: FinishReason | None


@dataclass(frozen=True)
class _Finished:
    """The end of a request that produced no last token (cancelled, or an expired deadline)."""

    reason: FinishReason


class Wakeups:
    """The async readers an engine step woke, gathered so that each event loop gets one call
    for all of them. A `call_soon_threadsafe` per reader cost the engine thread 0.7-0.9 ms a
    step at 64 streams on the CPU (half that batched; bench/bench_host_work.py) and woke the
    loop as often."""

    def __init__(self) -> None:
        self._flags: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, flag: asyncio.Event) -> None:
        self._flags.setdefault(loop, []).append(flag)

    def flush(self) -> None:
        """Wake every reader gathered since the last flush."""
        flags, self._flags = self._flags, {}
        for loop, events in flags.items():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # that loop is closed: nobody is waiting there any more
                pass


def _set_all(flags: list[asyncio.Event]) -> None:
    for flag in flags:
        flag.set()


class RequestHandle:
    """The caller's end of one request: iterate (sync or async) over its events, or cancel it.

    The engine thread pushes token ids and a finish (cheap); the reader turns them into events.
    A failure inside the engine ends the stream by raising that exception from the iteration.
    Read it from one thread or task at a time.
    """

    def __init__(self, request_id: str, output: OutputProcessor, prompt_tokens: int,
                 on_cancel: Callable[[], None] | None = None) -> None:
        self.request_id = request_id
        self.arrival = time.monotonic()
        # Written by the engine thread when it happens; read when the finish is built.
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self._output = output
        self._prompt_tokens = prompt_tokens
        self._on_cancel = on_cancel
        # A plain flag (one store, atomic under the GIL): cheap for the engine to read across a
        # whole batch once a cancel has been noted.
        self.cancelled = False
        self._cond = threading.Condition()
        # The engine appends without the lock (deque appends are thread-safe) and takes it only
        # when the reader has announced, under the lock, that it is about to sleep.
        self._pushed: deque[_Token | _Finished | BaseException] = deque()
        self._reader_sleeps = False
        self._ready: deque[Event] = deque()  # built events not yet returned
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._done = False

    def cancel(self) -> None:
        """Ask the engine to drop this request; it finishes with reason "cancelled"."""
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    # -- engine side -------------------------------------------------------------------------

    def push_token(self, token_id: int, is_eos: bool, finish: FinishReason | None,
                   wakeups: Wakeups | None = None) -> None:
        """One generated token; an async reader it wakes is woken now, or by `wakeups`'s
        next flush when given (the engine flushes once per step)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self._pushed.append(_Token(token_id, is_eos, finish))
        if self._reader_sleeps:
            self._wake_reader(wakeups)

    def push_finish(self, reason: FinishReason) -> None:
        self._pushed.append(_Finished(reason))
        self._wake_reader()

    def push_error(self, error: BaseException) -> None:
        self._pushed.append(error)
        self._wake_reader()

    def _wake_reader(self, wakeups: Wakeups | None = None) -> None:
        with self._cond:
            self._reader_sleeps = False
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        gathered = Wakeups() if wakeups is None else wakeups
        for loop, flag in waiters:
            gathered.add(loop, flag)
        if wakeups is None:  # no step will flush them: wake them now
            gathered.flush()

    # -- reader side -------------------------------------------------------------------------

    def _events_of(self, item: _Token | _Finished | BaseException) -> list[Event]:
        """The public events for one pushed item (raises the engine's failure)."""
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, _Finished):
            tail = self._output.final_delta()
            tokens = [TokenEvent(tail, [], self._output.completion_tokens)] if tail else []
            return [*tokens, self._finish(item.reason)]
        # Every token already pushed goes into this one event, as vLLM's output collector
        # merges what a slow consumer has not read: under load that is one message (and one
        # pass up the stream's generators) per several tokens, where the reader would fall
        # further behind taking them one at a time.
        ids, deltas = [], []
        while True:
            ids.append(item.token_id)
            deltas.append(self._output.on_token(item.token_id, is_eos=item.is_eos))
            reason = item.finish
            if self._output.stopped:
                self.cancel()  # a stop string ended the text: free the engine's row
                reason = "stop"
            if reason is not None or not self._pushed or not isinstance(self._pushed[0], _Token):
                break
            item = self._pushed.popleft()
        if reason is None:
            return [TokenEvent("".join(deltas), ids, self._output.completion_tokens)]
        deltas.append(self._output.final_delta())
        return [TokenEvent("".join(deltas), ids, self._output.completion_tokens),
                self._finish(reason)]

    def _finish(self, reason: FinishReason) -> FinishEvent:
        self._done = True
        now = time.monotonic()
        return FinishEvent(
            reason=reason, text=self._output.final_text(), prompt_tokens=self._prompt_tokens,
            completion_tokens=self._output.completion_tokens,
            queue_wait_s=(self.admitted_at or now) - self.arrival,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.arrival,
            total_s=now - self.arrival,
        )

    def _next_ready(self) -> Event | None:
        """The next event, if one can be had without waiting (called under `_cond`)."""
        if not self._ready:
            if self._done:
                raise StopIteration
            if not self._pushed:
                return None
            self._ready.extend(self._events_of(self._pushed.popleft()))
        return self._ready.popleft()

    def _next_or_announce(self) -> Event | None:
        """The next event; or None once the reader has announced that it will sleep (under
        `_cond`). The second look catches a push made before the announcement was visible;
        any later push sees it and wakes the reader."""
        event = self._next_ready()
        if event is None:
            self._reader_sleeps = True
            event = self._next_ready()
        return event

    def __iter__(self) -> RequestHandle:
        return self

    def __next__(self) -> Event:
        with self._cond:
            while (event := self._next_or_announce()) is None:
                self._cond.wait()
        return event

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> Event:
        while True:
            with self._cond:
                try:
                    event = self._next_or_announce()
                except StopIteration:
                    raise StopAsyncIteration from None
                if event is None:
                    flag = asyncio.Event()
                    self._async_waiters.append((asyncio.get_running_loop(), flag))
            if event is None:
                await flag.wait()
                continue
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
    sampler: Any  # server.sampling.RowSampler (holds torch state; kept opaque here)
    slot: int = 0  # LoRA slot of its adapter, set at admission; 0 = bare base
    holds_pin: bool = False  # whether it holds a pin on its adapter in the cache
    status: RequestStatus = RequestStatus.WAITING
    num_output_tokens: int = 0
    # Set by the scheduler when the request is queued, so that a step's per-row update is a
    # set lookup and one comparison: the ids that end it (none under `ignore_eos`), and how
    # many tokens it may produce (its own limit, capped by the context left after its prompt).
    stop_ids: frozenset[int] = frozenset()
    token_limit: int = 0
    arrival: int = 0  # its place among every request queued, from 1 (set by the scheduler)

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @cached_property
    def adapter_label(self) -> str:
        return adapter_name(self.spec.adapter)

    @property
    def prompt_len(self) -> int:
        return len(self.spec.prompt_ids)

    def abort_requested(self, now: float) -> bool:
        """Whether the caller cancelled or the deadline had passed at `now` (one clock read
        serves a whole step's rows)."""
        deadline = self.spec.deadline
        return self.handle.cancelled or (deadline is not None and now >= deadline)

    @property
    def finish_reason(self) -> FinishReason | None:
        """The wire reason of a finished (non-error) status; None while it runs."""
        return _FINISH_REASON.get(self.status)
