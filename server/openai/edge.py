"""The ASGI layer around the HTTP app: request ids, the protocol label, body limit and drain.

Every request gets the caller's `x-request-id` (or a fresh id) bound for its whole life, as the
gRPC edge does, and sent back in the response headers; it gets a `CallRecord` the core fills,
recorded in the metrics just before its last byte is sent (server/observe.py), labelled
protocol="http". A body over max_request_bytes is answered 413 before the app reads it. While
the server drains (SIGTERM), new requests are answered 503 and the ones in flight, streams
included, are counted until their last byte is sent, so `drained()` means every caller has its
answer. This wraps the whole FastAPI app, outside Starlette's own error middleware, so a failure
the app did not expect is logged here with its request id.
"""

from __future__ import annotations

import logging
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.core.record import CallRecord, current_record, recording
from server.drain import SHUTTING_DOWN, InFlight
from server.errors import SwitchboardError, UnavailableError
from server.logging_setup import REQUEST_ID_METADATA_KEY, new_request_id, request_context
from server.metrics import protocol_var
from server.observe import observe_call
from server.openai.errors import PayloadTooLargeError, error_body, http_error_of
from server.runtime import Runtime

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID_HEADER = REQUEST_ID_METADATA_KEY.encode()


def request_id_of(scope: Scope) -> str:
    """The caller's x-request-id (so its logs and ours line up), else a fresh id."""
    for name, value in scope.get("headers", ()):
        if name == _REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            if 0 < len(text) <= MAX_REQUEST_ID_CHARS and text.isprintable():
                return text
    return new_request_id()


def route_of(scope: Scope) -> str:
    """The metrics `method` label: the matched route's template ("POST /v1/models/{model}"),
    never the path a client typed, so the label stays bounded."""
    route = scope.get("route")
    template = getattr(route, "path", None) or "unmatched"
    return f"{scope.get('method', '?')} {template}"


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def error_response(error: SwitchboardError) -> JSONResponse:
    row = http_error_of(error)
    return JSONResponse(error_body(str(error), row), status_code=row.status)


def _too_large(limit: int, size: int | str) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is {size} bytes; this server accepts at most {limit} "
        "(setting max_request_bytes, --max-request-bytes)")


class HttpEdge(InFlight):
    """ASGI middleware: wrap `app` once; `begin()` (new requests get 503) and `drained()`
    serve the shutdown."""

    def __init__(self, app: ASGIApp, max_request_bytes: int, runtime: Runtime) -> None:
        super().__init__()
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        token = protocol_var.set("http")
        record, started = CallRecord(), time.monotonic()
        observed = False

        def observe() -> None:
            nonlocal observed
            if not observed:
                observed = True
                observe_call(self.runtime.metrics, route_of(scope), record,
                             time.monotonic() - started)

        async def sending(message: Message) -> None:
            # Counted before its last byte goes out, so a caller that has its whole answer
            # and then reads the metrics finds the call there.
            if message["type"] == "http.response.body" and not message.get("more_body"):
                observe()
            await send(message)

        try:
            with request_context(request_id), recording(record):
                await self._serve(scope, receive, _with_request_id(sending, request_id))
        except BaseException as e:
            record.error = e
            raise
        finally:
            observe()  # a call that ended without its last byte (a failure, a disconnect)
            protocol_var.reset(token)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = declared_length(scope)
        if length is not None and length > self.max_request_bytes:
            await self._refuse(_too_large(self.max_request_bytes, length), scope, receive, send)
            return
        if not self.enter():
            await self._refuse(UnavailableError(SHUTTING_DOWN), scope, receive, send)
            return
        try:
            await self.app(scope, self._limited(receive), send)
        except Exception:  # noqa: BLE001 - Starlette already answered 500; log it with the id
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
        finally:
            self.leave()

    @staticmethod
    async def _refuse(error: SwitchboardError, scope: Scope, receive: Receive,
                      send: Send) -> None:
        current_record().error = error
        await error_response(error)(scope, receive, send)

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that refuses a chunked body growing past the limit."""
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_request_bytes:
                raise _too_large(self.max_request_bytes, f"more than {self.max_request_bytes}")
            return message

        return limited


def _with_request_id(send: Send, request_id: str) -> Send:
    header = (_REQUEST_ID_HEADER, request_id.encode("latin-1"))

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return sending


__all__ = ["HttpEdge", "error_response", "request_id_of"]
