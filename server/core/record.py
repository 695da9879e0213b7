"""What one call did, in numbers: the core fills it in, the edge turns it into metrics once.

The edge (server/interceptor.py for gRPC, server/openai/edge.py for HTTP) binds a fresh
`CallRecord` per call with `recording()`; the core reaches it with `current_record()` and only
writes facts (the adapter it resolved, the engine's timings, what truncation dropped). No core
module knows a metric's name: server/observe.py maps a finished record to the metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from server.adapters import AdapterVersion


@dataclass(frozen=True)
class EngineUsage:
    """One engine request's timings and token counts, as its finish event gave them."""

    adapter: str | None  # the adapter key; None for the bare base
    queue_wait_s: float | None
    ttft_s: float | None
    total_s: float
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class TruncationUsage:
    strategy: str
    messages_dropped: int
    tokens_dropped: int


@dataclass
class CallRecord:
    """Facts about one call; `chat` is set once the call is known to be a chat (also when it
    fails validation), so only chats count as requests in the per-adapter series."""

    chat: bool = False
    requested: str = ""  # the adapter reference the caller typed
    adapter: AdapterVersion | None = None
    resolved: bool = False
    key_name: str = ""  # the caller's key name ("" when auth is off)
    answer: EngineUsage | None = None
    generated: int = 0  # tokens of the answer so far (also of one that failed midway)
    inter_token_s: list[float] = field(default_factory=list)
    truncation: TruncationUsage | None = None
    summaries: list[EngineUsage] = field(default_factory=list)
    sessions_stored: int | None = None
    # Set by the HTTP edge's error handlers, which answer before the middleware sees the error.
    error: BaseException | None = None
    cancelled: bool = False

    def begin_chat(self, requested: str) -> None:
        self.chat = True
        self.requested = requested

    def resolve(self, adapter: AdapterVersion | None) -> None:
        self.adapter, self.resolved = adapter, True

    @property
    def adapter_key(self) -> str | None:
        """The adapter of the answer: its key, None for the bare base, UNRESOLVED for a name
        that did not resolve (user-typed names must not take the bounded label slots)."""
        if self.resolved:
            return self.adapter.key if self.adapter is not None else None
        return UNRESOLVED if self.requested else None


UNRESOLVED = "other"  # server.metrics.OTHER_LABEL, without the core importing metrics

_record: ContextVar[CallRecord | None] = ContextVar("switchboard_call_record", default=None)


def current_record() -> CallRecord:
    """The record of the call being served, or a detached one (work outside any call)."""
    record = _record.get()
    return record if record is not None else CallRecord()


@contextmanager
def recording(record: CallRecord) -> Iterator[CallRecord]:
    token = _record.set(record)
    try:
        yield record
    finally:
        _record.reset(token)
