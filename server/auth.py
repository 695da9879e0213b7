"""Who may call what: API and admin keys from call metadata, checked before any handler runs.

A key comes as `authorization: Bearer <key>` (or `x-api-key: <key>`). InferenceService (chat,
score) takes an API key or an admin key; every other service takes an admin key only, so a
service added later is admin-only until this table says otherwise. Health and reflection are
open: load balancers and tools probe them without secrets.

Keys are compared in constant time against every configured key, and no key (nor any part of
one) is ever logged: a rejected call logs its method, the reason and the peer.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from server.api import SERVICE_NAMES, status_for
from server.errors import PermissionDeniedError, SwitchboardError, UnauthenticatedError

log = logging.getLogger(__name__)

AUTHORIZATION_METADATA = "authorization"
API_KEY_METADATA = "x-api-key"
BEARER = "bearer "
HOW_TO_SEND = (f"send '{AUTHORIZATION_METADATA}: Bearer <key>' (or '{API_KEY_METADATA}: <key>') "
               "in the call metadata")

INFERENCE_SERVICE = SERVICE_NAMES[0]
PUBLIC_SERVICES = frozenset({
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
    "grpc.reflection.v1.ServerReflection",
})


class KeyKind(Enum):
    API = "api"
    ADMIN = "admin"


def service_of(method: str) -> str:
    """'/pkg.Service/Method' -> 'pkg.Service'."""
    return method.lstrip("/").split("/", 1)[0]


def required_kind(method: str) -> KeyKind | None:
    """The weakest key kind that may call `method`; None for the open services."""
    service = service_of(method)
    if service in PUBLIC_SERVICES:
        return None
    return KeyKind.API if service == INFERENCE_SERVICE else KeyKind.ADMIN


def presented_key(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The key the caller sent: the bearer token of `authorization`, else `x-api-key`."""
    bearer = plain = None
    for name, value in metadata or ():
        if not isinstance(value, str):
            continue  # binary (-bin) metadata never carries a key
        if name == AUTHORIZATION_METADATA and value[:len(BEARER)].lower() == BEARER:
            bearer = value[len(BEARER):].strip()
        elif name == API_KEY_METADATA:
            plain = value.strip()
    return bearer or plain or None


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of key lengths too.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class AuthRejected(Exception):
    """A call the key ring refused: `reason` for the log, `error` for the caller."""

    def __init__(self, reason: str, error: SwitchboardError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


@dataclass(frozen=True, repr=False)
class KeyRing:
    """The configured keys (as digests) and their kinds; `repr` shows counts only."""

    _entries: tuple[tuple[bytes, KeyKind], ...]

    @classmethod
    def of(cls, api_keys: Sequence[str], admin_keys: Sequence[str]) -> KeyRing:
        return cls(tuple([(_digest(k), KeyKind.API) for k in api_keys]
                         + [(_digest(k), KeyKind.ADMIN) for k in admin_keys]))

    def __repr__(self) -> str:
        return f"KeyRing({len(self._entries)} keys)"

    def kind_of(self, key: str) -> KeyKind | None:
        """The kind of `key`, or None when no configured key matches. Every configured key is
        compared, whatever matched before, so the time taken says nothing about which one."""
        presented = _digest(key)
        found = None
        for known, kind in self._entries:
            if hmac.compare_digest(presented, known):
                found = kind
        return found

    def check(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """Raise AuthRejected unless the call's metadata carries a key that may call `method`."""
        needed = required_kind(method)
        if needed is None:
            return
        key = presented_key(metadata)
        if key is None:
            raise AuthRejected("no key", UnauthenticatedError(
                f"{method} needs an API key: {HOW_TO_SEND}"))
        kind = self.kind_of(key)
        if kind is None:
            raise AuthRejected("unknown key", UnauthenticatedError(
                f"the key sent with {method} is not a valid key: {HOW_TO_SEND}"))
        if needed is KeyKind.ADMIN and kind is not KeyKind.ADMIN:
            raise AuthRejected("wrong kind", PermissionDeniedError(
                f"{method} needs an admin key; this key may only call {INFERENCE_SERVICE}"))


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

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        try:
            self.keys.check(details.method, details.invocation_metadata)
        except AuthRejected as rejected:
            return _rejecting(handler, details.method, rejected)
        return handler


__all__ = ["AuthInterceptor", "KeyKind", "KeyRing", "presented_key", "required_kind",
           "with_behaviour"]
