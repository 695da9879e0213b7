"""The shutdown gate: counts calls in flight and, once draining, refuses new ones.

Draining refuses calls at the door instead of closing the port, so health checks keep answering
(NOT_SERVING) while the calls already running finish. A call counts from the moment its handler
starts until grpc has sent its status (the context's done callback), so "no calls in flight"
means every client has its answer, not just that the handlers returned.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import grpc

from server.errors import UnavailableError
from server.interceptor import ServiceInterceptor, with_behaviour
from server.status import status_for

SHUTTING_DOWN = "server is shutting down; retry on another replica"


class InFlight:
    """Counts calls in flight and, once draining, admits no more; transport-neutral (the HTTP
    edge, server/openai/edge.py, counts its requests with it too)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        """From now on new calls are refused; running ones go on."""
        self.draining = True

    async def drained(self, timeout: float) -> bool:
        """Wait until no call is in flight; False when `timeout` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def enter(self) -> bool:
        """Count one more call, or False (not counted) once draining. Callers do not await
        between their check and this, so a call is either counted before draining began or
        refused: none slips through uncounted."""
        if self.draining:
            return False
        self.in_flight += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()


class DrainGate(InFlight, ServiceInterceptor):
    """Interceptor for every service but `exempt` (health): admits or refuses (UNAVAILABLE),
    and counts."""

    def __init__(self, exempt: frozenset[str]) -> None:
        InFlight.__init__(self)
        ServiceInterceptor.__init__(self, exempt)

    def _admit(self, context: grpc.aio.ServicerContext) -> bool:
        # Checked when the handler starts; the call counts until grpc has sent its status.
        if not self.enter():
            return False
        context.add_done_callback(lambda _context: self.leave())
        return True

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        shape = (bool(handler.request_streaming), bool(handler.response_streaming))
        behaviour = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
                     (True, False): handler.stream_unary, (True, True): handler.stream_stream}
        gated = _gated(behaviour[shape], self._admit)
        return handler if gated is None else with_behaviour(handler, gated)


async def _refuse(context: grpc.aio.ServicerContext) -> None:
    error = UnavailableError(SHUTTING_DOWN)
    await context.abort(status_for(error), str(error))


def _gated(behaviour: Any, admit: Callable[[grpc.aio.ServicerContext], bool]) -> Any:
    """`behaviour` behind the gate, keeping its kind (grpc.aio dispatches on it). Returns None
    for synchronous behaviours, which this server does not register."""
    if inspect.isasyncgenfunction(behaviour):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not admit(context):
                await _refuse(context)
            async for item in behaviour(request, context):
                yield item

        return stream
    if inspect.iscoroutinefunction(behaviour):
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not admit(context):
                await _refuse(context)
            return await behaviour(request, context)

        return call
    return None


__all__ = ["SHUTTING_DOWN", "DrainGate", "InFlight"]
