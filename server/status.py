"""The gRPC edge's one error table: each domain error (server/errors.py) to its status code.

The interceptor (server/interceptor.py), auth and the drain gate answer through it; the metrics
`code` label uses its names for both protocols, so dashboards need no second table. The HTTP
edge keeps its own table (server/openai/errors.py). Messages leave the server with its adapters
directory replaced by a placeholder.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from server.errors import (
    AdapterInUseError,
    AdapterLoadError,
    ContextOverflowError,
    DeadlineExceededError,
    FailedPreconditionError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SessionBusyError,
    UnauthenticatedError,
    UnavailableError,
)

STATUS_BY_ERROR: dict[type[BaseException], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    IncompatibleAdapterError: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterInUseError: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ContextOverflowError: grpc.StatusCode.OUT_OF_RANGE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    SessionBusyError: grpc.StatusCode.ABORTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    # A caller that went away (its task cancelled, its stream closed).
    asyncio.CancelledError: grpc.StatusCode.CANCELLED,
    GeneratorExit: grpc.StatusCode.CANCELLED,
}


def status_for(error: BaseException | None) -> grpc.StatusCode:
    """The status code of the most specific known class of `error` (OK for None); INTERNAL
    for the unexpected."""
    if error is None:
        return grpc.StatusCode.OK
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def code_name(error: BaseException | None) -> str:
    """The metrics `code` label of a call that ended with `error` ("OK" for None)."""
    return status_for(error).name


ADAPTERS_ROOT_PLACEHOLDER = "<adapters-root>"


def redact_paths(message: str, adapters_root: Path) -> str:
    """The message with the server's adapters directory replaced by a placeholder: callers
    learn which adapter file is wrong, not where the server keeps its files."""
    for form in {str(adapters_root.resolve()), str(adapters_root)}:
        if form not in ("", ".", "/"):
            message = message.replace(form, ADAPTERS_ROOT_PLACEHOLDER)
    return message
