"""The gRPC edge around every call: request id, decoding, status codes and metrics, once.

For each call of our services the interceptor picks the request id (the caller's x-request-id,
else a fresh one), sends it first in the initial metadata (so even a failed call carries the id
the server's log lines use) and binds it for the call's life; binds a fresh `CallRecord` for
the core to fill; turns a domain error into its status code (server/status.py), with the
adapters directory redacted and a `retry-after` trailer where the error knows one; and records
the finished call in the metrics (server/observe.py). Unexpected errors are logged with their
traceback and answered INTERNAL with the request id. Health and reflection pass untouched.

Requests are decoded here too (`deserializer`): a body protobuf refuses, such as a string field
holding invalid UTF-8, reaches the handler as an `UndecodableRequest` and is answered
INVALID_ARGUMENT instead of grpc's own UNKNOWN.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.core.record import CallRecord, recording
from server.errors import InvalidArgumentError
from server.logging_setup import (
    REQUEST_ID_METADATA_KEY,
    current_request_id,
    new_request_id,
    request_context,
)
from server.observe import observe_call
from server.ratelimit import RETRY_AFTER_METADATA, retry_after_text
from server.status import redact_paths, status_for

log = logging.getLogger(__name__)
MAX_REQUEST_ID_CHARS = 128


def service_of(method: str) -> str:
    """'/pkg.Service/Method' -> 'pkg.Service'."""
    return method.lstrip("/").split("/", 1)[0]


Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]
_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def with_behaviour(handler: grpc.RpcMethodHandler, behaviour: Behaviour) -> grpc.RpcMethodHandler:
    """`handler` with the same shape and (de)serializers, running `behaviour` instead."""
    factory = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(behaviour, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps the handlers of every service but `exempt` ones (health)."""

    def __init__(self, exempt: frozenset[str]) -> None:
        self.exempt = exempt

    @abc.abstractmethod
    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler to run for `method` instead of `handler`."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or service_of(details.method) in self.exempt:
            return handler
        return self.wrap(handler, details.method)


@dataclass(frozen=True)
class UndecodableRequest:
    """What the handler gets instead of a request protobuf could not parse."""

    type_name: str
    error: str

    def check(self) -> None:
        raise InvalidArgumentError(
            f"request is not a valid {self.type_name}: {self.error}; strings must be UTF-8")


def deserializer(message_type: Any) -> Callable[[bytes], Any]:
    """`message_type.FromString`, but a body it refuses becomes an UndecodableRequest: grpc
    would otherwise answer UNKNOWN before any handler (or its error mapping) runs."""

    def deserialize(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return UndecodableRequest(message_type.DESCRIPTOR.full_name, str(e))

    return deserialize


def _metadata_request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id (so its logs and ours line up), else a fresh id."""
    for key, value in context.invocation_metadata() or ():
        if (key == REQUEST_ID_METADATA_KEY and isinstance(value, str)
                and 0 < len(value) <= MAX_REQUEST_ID_CHARS):
            return value
    return new_request_id()


class _Call:
    """One call's edge state: its method, record and start time."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext,
                 adapters_root: Path) -> None:
        self.method = method
        self.context = context
        self.adapters_root = adapters_root
        self.record = CallRecord()
        self.started = time.monotonic()

    async def abort(self, error: Exception) -> None:
        """Known failures get their own code and message; anything else INTERNAL."""
        code = status_for(error)
        name = self.method.rsplit("/", 1)[-1]
        if code is grpc.StatusCode.INTERNAL:
            log.error("unexpected error in %s", name, exc_info=error)
            await self.context.abort(code, f"internal error in {name} ({type(error).__name__}); "
                                           f"see the server log for request "
                                           f"{current_request_id()}")
        if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
            log.info("%s refused: %s", name, error)  # the full paths stay in the server's log
        retry_after = getattr(error, "retry_after_s", None)
        trailers = () if retry_after is None else ((RETRY_AFTER_METADATA,
                                                    retry_after_text(retry_after)),)
        await self.context.abort(code, redact_paths(str(error), self.adapters_root), trailers)


class CallInterceptor(ServiceInterceptor):
    """Wraps every handler of our services (not `exempt` ones) as the module docstring says."""

    def __init__(self, metrics: Callable[[], Any], adapters_root: Path,
                 exempt: frozenset[str]) -> None:
        super().__init__(exempt)
        self.metrics = metrics  # read per call: the metrics exist once the server has started
        self.adapters_root = adapters_root

    @contextmanager
    def _scope(self, call: _Call) -> Iterator[None]:
        with recording(call.record):
            try:
                yield
            except grpc.aio.AbortError:
                raise
            except BaseException as e:
                call.record.error = e
                raise
            finally:
                observe_call(self.metrics(), call.method, call.record,
                             time.monotonic() - call.started)

    async def _open(self, method: str, request: Any,
                    context: grpc.aio.ServicerContext) -> tuple[_Call, str]:
        request_id = _metadata_request_id(context)
        await context.send_initial_metadata(((REQUEST_ID_METADATA_KEY, request_id),))
        return _Call(method, context, self.adapters_root), request_id

    @asynccontextmanager
    async def _guard(self, method: str, request: Any,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """The call's id, record and metrics around a handler; a failure becomes its status."""
        call, request_id = await self._open(method, request, context)
        failure: Exception | None = None
        with request_context(request_id):
            with self._scope(call):
                try:
                    if isinstance(request, UndecodableRequest):
                        request.check()
                    yield
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as e:  # noqa: BLE001 - the one last-resort handler
                    call.record.error = failure = e
            if failure is not None:
                # Only once the call is observed: a client that has its status may read the
                # metrics at once, and must find this call counted.
                await call.abort(failure)

    def _unary(self, method: str, behaviour: Any) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._guard(method, request, context):
                return await behaviour(request, context)

        return unary

    def _stream(self, method: str, behaviour: Any) -> Any:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._guard(method, request, context):
                async for item in behaviour(request, context):
                    yield item

        return stream

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return with_behaviour(handler, self._stream(method, handler.unary_stream))
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            return with_behaviour(handler, self._unary(method, handler.unary_unary))
        return handler


__all__ = ["CallInterceptor", "UndecodableRequest", "deserializer", "service_of",
           "with_behaviour"]
