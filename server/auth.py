"""Who may call what, on gRPC: the key table per service and the interceptor enforcing it.

A key comes as `authorization: Bearer <key>` (or `x-api-key: <key>`). InferenceService (chat,
score) and SessionService (a key's own sessions; ownership is checked in server/core) take
an API key or an admin key; every other service takes an admin key only, so a service added
later is admin-only until this table says otherwise. Health and reflection are open: load
balancers and tools probe them without secrets. Who a key is (its name, scope and limits) and
the transport-neutral `KeyRing.authorize` live in server/keys.py; the interceptor reads the ring
in force from `LiveKeys`, which a SIGHUP reload swaps (server/app.py).

Keys are compared in constant time against every configured key, and no key (nor any part of
one) is ever logged: a rejected call logs its method, the reason and the peer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from server.api import SERVICE_NAMES
from server.interceptor import service_of, with_behaviour
from server.keys import (
    API_KEY_METADATA,
    AUTHORIZATION_METADATA,
    HOW_TO_SEND,
    AuthRejected,
    Caller,
    KeyKind,
    KeyRing,
    LiveKeys,
    presented_key,
)
from server.status import status_for

log = logging.getLogger(__name__)

INFERENCE_SERVICE, _ADAPTER_SERVICE, SESSION_SERVICE = SERVICE_NAMES
# Services any valid key may call; what each key sees there is decided by the service itself.
API_SERVICES = frozenset({INFERENCE_SERVICE, SESSION_SERVICE})
PUBLIC_SERVICES = frozenset({
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
    "grpc.reflection.v1.ServerReflection",
})


def required_kind(method: str) -> KeyKind | None:
    """The weakest key kind that may call `method`; None for the open services."""
    service = service_of(method)
    if service in PUBLIC_SERVICES:
        return None
    return KeyKind.API if service in API_SERVICES else KeyKind.ADMIN


def check(keys: KeyRing | LiveKeys, method: str,
          metadata: Iterable[tuple[str, Any]] | None) -> Caller | None:
    """The caller, or AuthRejected unless the call's metadata carries a key that may call
    `method` (None for the open services)."""
    return keys.authorize(presented_key(metadata), required_kind(method), method,
                          admin_only_for=" and ".join(sorted(API_SERVICES)))


def _rejecting(handler: grpc.RpcMethodHandler, method: str,
               rejected: AuthRejected) -> grpc.RpcMethodHandler:
    # A coroutine behaviour fits all four shapes: grpc.aio awaits it for unary responses and
    # treats it as a reader/writer handler for streamed ones; either way it only aborts.
    async def reject(_request: Any, context: grpc.aio.ServicerContext) -> None:
        log.warning("rejected call to %s: %s (peer %s)", method, rejected.reason, context.peer())
        await context.abort(status_for(rejected.error), str(rejected.error))

    return with_behaviour(handler, reject)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Answers calls without the right key with UNAUTHENTICATED / PERMISSION_DENIED."""

    def __init__(self, keys: LiveKeys) -> None:
        self.keys = keys

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        try:
            check(self.keys, details.method, details.invocation_metadata)
        except AuthRejected as rejected:
            return _rejecting(handler, details.method, rejected)
        return handler


__all__ = ["API_KEY_METADATA", "AUTHORIZATION_METADATA", "HOW_TO_SEND", "AuthInterceptor",
           "AuthRejected", "KeyKind", "KeyRing", "LiveKeys", "check", "presented_key",
           "required_kind", "with_behaviour"]
