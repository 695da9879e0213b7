"""The generate step: one engine request, submitted, streamed, cancellable from any thread.

Chats and summaries both go through it; the engine admits the adapter itself (it reads a
non-resident one while the request waits), so no step here retries or loads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from server.core.record import EngineUsage
from server.errors import UnavailableError
from server.request import FinishEvent, GenerationRequest, TokenEvent


def usage_of(finish: FinishEvent, adapter: str | None) -> EngineUsage:
    return EngineUsage(adapter, finish.queue_wait_s, finish.ttft_s, finish.total_s,
                       finish.prompt_tokens, finish.completion_tokens)


class Generation:
    """One request in the engine: `stream()` yields TokenEvents then one FinishEvent; leaving
    the stream early (an error, a cancelled caller) cancels the request in the engine."""

    def __init__(self, engine: Any, request: GenerationRequest) -> None:
        self.engine = engine
        self.request = request
        self._handle: Any = None
        self._cancelled = False
        self._finished = False

    def cancel(self) -> None:
        self._cancelled = True
        if self._handle is not None and not self._finished:
            self._handle.cancel()

    async def stream(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        self._handle = self.engine.submit(self.request)
        if self._cancelled:
            self._handle.cancel()
        try:
            async for event in self._handle:
                if isinstance(event, FinishEvent):
                    self._finished = True
                yield event
        finally:
            if not self._finished:
                self._handle.cancel()

    async def finish(self) -> FinishEvent:
        """Run to the end and return the finish event (the text is in it)."""
        async for event in self.stream():
            if isinstance(event, FinishEvent):
                return event
        raise UnavailableError("the engine ended a request without a finish event")
